"""TrainingData: what one stage hands the next — hidden states, targets and the mask of hard tokens.

Block 0 starts from token ids (`TrainingData.from_windows`); every later block from the hidden states
the previous block produced, where tokens that are not hard were kept unchanged. Saved with
safetensors plus a small JSON header so a stage's dump can be inspected and reloaded without pickle.
`StreamedTrainingData` is the form that stores no states: they are computed per batch by the frozen earlier
blocks, and a stage hands on only its hard-token mask (`save_mask`, 1 byte per token).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lego.atomic import TEMP_SUFFIX, atomic_write, reserve_space
from lego.errors import DataError

if TYPE_CHECKING:
    from lego.training.propagation import FrozenPrefix

FORMAT = "lego.TrainingData/1"
# token ids and targets: files hold int32, token files (lego.data) uint16 or uint32
TOKEN_DTYPES = {torch.uint16, torch.uint32, torch.int32, torch.int64}


@dataclass
class TrainingData:
    """`hidden_states` (sequences, seq, dim) float, or `input_ids` (sequences, seq) int for Block 0;
    `targets` (sequences, seq) int; `active` (sequences, seq) bool, the tokens the next block trains on.

    Token ids and targets keep the type they come in: views of the token windows when built from them (uint16 for
    a token file), int32 when read from a file (files store int32: any vocabulary fits, 4 bytes per token less),
    and a memory-mapped file is used as it is, without an int64 copy in memory. A selection (`select`, `batches`)
    widens uint16 and uint32 to int64, for the embedding and the loss. `len(data)` is the number of active tokens.
    """

    hidden_states: Tensor | None
    targets: Tensor
    active: Tensor
    input_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.hidden_states is None) == (self.input_ids is None):
            raise ValueError("TrainingData needs exactly one of hidden_states and input_ids")
        if self.targets.dim() != 2 or self.active.shape != self.targets.shape:
            raise ValueError(
                f"targets and active must both be (sequences, seq); got {tuple(self.targets.shape)} "
                f"and {tuple(self.active.shape)}"
            )
        ids = self.targets.dtype, self.targets.dtype if self.input_ids is None else self.input_ids.dtype
        if self.active.dtype != torch.bool or not set(ids) <= TOKEN_DTYPES:
            raise ValueError(f"active must be bool and targets, input_ids int32/int64, got {self.active.dtype}, {ids}")
        inputs = self.inputs
        if inputs.shape[:2] != self.targets.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} do not match targets {tuple(self.targets.shape)}")
        if self.hidden_states is not None and (
            self.hidden_states.dim() != 3 or not self.hidden_states.is_floating_point()
        ):
            raise ValueError("hidden_states must be a float tensor (sequences, seq, dim)")

    @classmethod
    def from_windows(cls, windows: Tensor) -> TrainingData:
        """Token windows (sequences, seq + 1) -> Block 0's data: inputs w[:, :-1], targets w[:, 1:].

        `windows` is a tensor or a window view over a token file (`lego.data.TokenWindows`, whose `stored` tensor
        is the file itself). Inputs and targets are views of it and the mask is a single True broadcast to every
        token, so Block 0's data adds no memory that grows with the corpus."""
        windows = getattr(windows, "stored", windows)
        if windows.dtype not in TOKEN_DTYPES:
            windows = windows.long()
        return cls(
            hidden_states=None,
            targets=windows[:, 1:],
            active=torch.ones((), dtype=torch.bool).expand(windows.shape[0], windows.shape[1] - 1),
            input_ids=windows[:, :-1],
        )

    # -- shape -----------------------------------------------------------------------------------
    @property
    def inputs(self) -> Tensor:
        return self.hidden_states if self.hidden_states is not None else self.input_ids

    @property
    def num_sequences(self) -> int:
        return self.targets.shape[0]

    @property
    def seq_len(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return int(self.active.count_nonzero())  # (a sum would widen the mask to int64 first: 8 bytes a token)

    def select(self, rows: Tensor) -> TrainingData:
        """The sequences at `rows` (an index tensor or bool mask), token ids narrower than int32 widened to int64."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        ids = lambda t: None if t is None else _widen(t[rows])  # noqa: E731
        return TrainingData(pick(self.hidden_states), ids(self.targets), self.active[rows], ids(self.input_ids))

    def shard(self, rank: int, world: int) -> TrainingData:
        """Rank `rank`'s share of the sequences: every `world`-th one, starting at `rank` (`shard_rows`); views,
        so a memory-mapped token file stays unread until a batch needs it."""
        if world == 1:
            return self
        every = lambda t: None if t is None else t[rank::world]  # noqa: E731
        return TrainingData(every(self.hidden_states), every(self.targets), every(self.active), every(self.input_ids))

    def to(self, device: torch.device | str) -> TrainingData:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainingData(move(self.hidden_states), move(self.targets), move(self.active), move(self.input_ids))

    # -- iteration -------------------------------------------------------------------------------
    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0
    ) -> Iterator[TrainingData]:
        """Batches of whole sequences (attention needs the context), skipping sequences with no active
        token: they would cost compute and contribute no loss. `skip`: leave out the first `skip` batches of
        this order without building them (a stage resumed mid-epoch)."""
        rows = self.active.any(dim=1).nonzero().squeeze(1)
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(skip * batch_size, len(rows), batch_size):
            yield self.select(rows[start : start + batch_size])

    def num_batches(self, batch_size: int) -> int:
        return -(-int(self.active.any(dim=1).count_nonzero()) // batch_size)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """Random split by whole sequences (never by token, which would leak context)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        order = torch.randperm(self.num_sequences, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(self.num_sequences * val_fraction)))
        return self.select(order[n_val:].sort().values), self.select(order[:n_val].sort().values)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic write: a temp file renamed into place, so a kill never leaves a half file behind. Hidden
        states keep their dtype (the caller chooses the precision); token ids and targets are stored as int32."""
        path = Path(path)
        tensors = {"targets": self.targets.int().contiguous(), "active": self.active.contiguous()}
        if self.hidden_states is not None:
            tensors["hidden_states"] = self.hidden_states.contiguous()
        else:
            tensors["input_ids"] = self.input_ids.int().contiguous()
        meta = {
            "format": FORMAT,
            "sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "active_tokens": len(self),
            "dim": 0 if self.hidden_states is None else self.hidden_states.shape[-1],
        }
        cpu = {k: v.cpu() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"lego": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", mmap: bool = False) -> TrainingData:
        """Load and validate a file written by `save`; a truncated, foreign or inconsistent file is a
        `DataError` naming the file.

        `mmap=True` maps the tensors from the file instead of reading them (CPU only): batches are paged
        in as training touches them and the OS may drop them again, so a stage whose dump is larger than
        memory streams it from disk with bounded resident memory."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"TrainingData file not found: {path}")
        try:
            if mmap:
                meta, tensors = _map_safetensors(path)
            else:
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    meta = json.loads((f.metadata() or {}).get("lego", "{}"))
                    tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
            raise DataError(
                f"{path} is truncated or not a safetensors file ({err}); re-run the stage that wrote it"
            ) from err
        if meta.get("format") != FORMAT:
            raise DataError(
                f"{path} is not a LEGO TrainingData file (format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        try:
            data = cls(
                hidden_states=tensors.get("hidden_states"),
                targets=tensors["targets"],
                active=tensors["active"],
                input_ids=tensors.get("input_ids"),
            )
        except (KeyError, ValueError) as err:
            raise DataError(f"{path} has missing or mismatched tensors: {err}") from err
        expected = (meta.get("sequences"), meta.get("seq_len"), meta.get("active_tokens"))
        if expected != (data.num_sequences, data.seq_len, len(data)):
            raise DataError(f"{path}: header says (sequences, seq_len, active) = {expected}, tensors disagree")
        return data


class StreamedTrainingData(TrainingData):
    """A TrainingData whose hidden states are computed, not stored (`trainer.dump=stream`): each selection
    (`select`, so each batch of `batches`) runs the frozen `prefix` (the earlier blocks, each on its own active
    tokens) over those rows of `source` (Block 0's token ids, or states read from a dump). What it stores is the
    mask of the tokens to train on, `active` (a `MaskFile`, or a tensor): `len`, `num_batches` and `batches` work as
    on stored data. It has no inputs of its own (`hidden_states` and `input_ids` are None), so `save`, `shard` and
    `to` fail on it: build one per rank from the rank's source and mask."""

    def __init__(self, source: TrainingData, active: Tensor | MaskFile, prefix: FrozenPrefix) -> None:
        if active.shape != source.targets.shape or active.dtype != torch.bool:
            raise ValueError(
                f"the mask must be bool {tuple(source.targets.shape)}, got {active.dtype} {tuple(active.shape)}"
            )
        self.hidden_states, self.input_ids, self.targets, self.active = None, None, source.targets, active
        self.source, self.prefix = source, prefix

    def select(self, rows: Tensor) -> TrainingData:
        batch = self.source.select(rows)
        return TrainingData(self.prefix(batch, rows), batch.targets, self.active[rows])


def _widen(ids: Tensor) -> Tensor:
    """Token ids as the embedding and the loss take them: uint16 and uint32 (a token file's) become int64."""
    return ids.long() if ids.dtype in (torch.uint16, torch.uint32) else ids


# -- shards: one file per rank -------------------------------------------------------------------
def shard_rows(sequences: int, rank: int, world: int) -> Tensor:
    """The global sequence indices rank `rank` of `world` holds: rank, rank + world, rank + 2 * world, ...

    Round-robin, so local sequence i is global sequence `i * world + rank`, and the shards of any number
    of ranks interleave back into the global order.
    """
    return torch.arange(rank, sequences, world)


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its shard of the TrainingData at `path`; one rank uses `path`."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of{world}{path.suffix}")


def exceeds_budget(nbytes: float, memory_budget_mb: float | None) -> bool:
    """True when `nbytes` of stage data should be streamed from disk rather than held in memory
    (`memory_budget_mb`: None = no budget, 0 = always stream)."""
    return memory_budget_mb is not None and nbytes > memory_budget_mb * 2**20


def dump_bytes(sequences: int, seq_len: int, dim: int, itemsize: int = 4) -> int:
    """Size of a hidden-state TrainingData: `itemsize * dim` per token for the states, 5 for the int32 target
    and the mask."""
    return sequences * seq_len * (itemsize * dim + 5)


def load_within_budget(path: str | Path, memory_budget_mb: float | None) -> TrainingData:
    """A TrainingData file read into memory when it fits `memory_budget_mb`, memory-mapped otherwise.

    Mapped, batches are paged in as training touches them and the OS may drop them again, so a stage whose
    dump is larger than the budget streams it from disk with bounded owned memory. `None`: no budget
    (always read), 0: always stream.
    """
    size = Path(path).stat().st_size if Path(path).is_file() else 0  # a missing file: load() names it
    return TrainingData.load(path, mmap=exceeds_budget(size, memory_budget_mb))


def load_shard(
    path: str | Path, saved_world: int, rank: int, world: int, memory_budget_mb: float | None
) -> TrainingData:
    """Rank `rank` of `world`'s share of the TrainingData that `saved_world` ranks wrote as shards of `path`.

    The same number of ranks loads its own file (`load_within_budget`). Another number (a resume on more or
    fewer ranks) maps every saved shard, puts the sequences back in global order and takes this rank's
    round-robin share: in memory when it fits the budget, otherwise copied a chunk of sequences at a time
    into this rank's own shard file (`shard_path(path, rank, world)`), which is then memory-mapped.
    """
    if saved_world == world:
        return load_within_budget(shard_path(path, rank, world), memory_budget_mb)
    saved = [TrainingData.load(shard_path(path, r, saved_world), mmap=True) for r in range(saved_world)]
    total = sum(part.num_sequences for part in saved)
    wanted = shard_rows(total, rank, world)
    source, row = wanted % saved_world, wanted // saved_world

    def gather(field: str, rows: slice = slice(None)) -> Tensor | None:
        parts = [getattr(part, field) for part in saved]
        if parts[0] is None:
            return None
        src, picked_rows = source[rows], row[rows]
        out = parts[0].new_empty(len(src), *parts[0].shape[1:])
        for r, part in enumerate(parts):
            picked = src == r
            out[picked] = part[picked_rows[picked]]
        return out

    first = saved[0]
    if first.hidden_states is None:  # token ids (Block 0's data) are small: always in memory
        return TrainingData(None, gather("targets"), gather("active"), gather("input_ids"))
    dim, dtype = first.hidden_states.shape[-1], first.hidden_states.dtype
    bytes_per_sequence = dump_bytes(1, first.seq_len, dim, first.hidden_states.element_size())
    if not exceeds_budget(len(wanted) * bytes_per_sequence, memory_budget_mb):
        return TrainingData(gather("hidden_states"), gather("targets"), gather("active"))
    own = shard_path(path, rank, world)
    with HiddenStateWriter(own, len(wanted), first.seq_len, dim, dtype) as writer:
        chunk = max(1, int(memory_budget_mb * 2**20 // bytes_per_sequence))
        for start in range(0, len(wanted), chunk):
            rows = slice(start, start + chunk)
            writer.hidden[rows] = gather("hidden_states", rows=rows)
        writer.finish(gather("targets"), gather("active"))
    return TrainingData.load(own, mmap=True)


# -- hard-token masks: the streamed hand-off's files ----------------------------------------------
def save_mask(path: str | Path, chunks: Iterable[Tensor], shape: tuple[int, int]) -> None:
    """A (sequences, seq) bool mask as a .npy file, 1 byte per token, from `chunks` of its rows in order: written
    as they come (never whole in memory), atomically."""

    def write(tmp: Path) -> None:
        rows = 0
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|b1", "fortran_order": False, "shape": tuple(shape)})
            for chunk in chunks:
                f.write(chunk.numpy().tobytes())
                rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"the mask's chunks hold {rows} rows, not {shape[0]}")

    atomic_write(path, write)


def load_mask(path: str | Path) -> MaskFile:
    """A mask `save_mask` wrote, read by file reads (`MaskFile`); a missing, truncated or foreign file is a DataError
    naming it."""
    try:
        with open(path, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):  # save_mask writes a version 1.0 header
                raise ValueError("not a version 1.0 .npy file")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
        if fortran or offset + math.prod(shape) != os.path.getsize(path):
            raise ValueError(f"{os.path.getsize(path) - offset} bytes of data for a {shape} mask")
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path} is missing, truncated or not a hard-token mask ({err}); re-run the stage that wrote it"
        ) from err
    if dtype != np.bool_ or len(shape) != 2:
        raise DataError(f"{path} holds {dtype} {shape}, not a (sequences, seq) bool hard-token mask")
    return MaskFile(Path(path), shape, offset)


class MaskFile:
    """A (sequences, seq) bool hard-token mask in a file, read by plain file reads: rows by slice or index tensor
    (`mask[rows]`, a tensor), and the few whole-mask reductions the training loop takes of `TrainingData.active`
    (`any(dim=1)`, `count_nonzero()`, `all()`, a chunk at a time, remembered). Unlike a memory map, the pages it
    reads stay in the OS's page cache, out of this process's RSS: a streamed stage holds one flag per window, not a
    byte per token, however large the corpus. `mask[:]` is the whole mask in memory."""

    dtype = torch.bool
    CHUNK_BYTES = 1 << 24

    def __init__(self, path: Path, shape: tuple[int, int], offset: int) -> None:
        self.path, self.shape, self.offset = path, torch.Size(shape), offset
        self._rows_any: Tensor | None = None  # with _count: one pass over the file, on first use
        self._count = 0

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, index: int | slice | Tensor) -> Tensor:
        if isinstance(index, int):
            return self[index : index + 1][0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            with open(self.path, "rb") as f:
                return self._read(f.fileno(), start, max(start, stop))[::step]
        index = torch.as_tensor(index)
        rows = (index.nonzero().squeeze(1) if index.dtype == torch.bool else index.long()).reshape(-1)
        out = torch.empty(len(rows), self.shape[1], dtype=torch.bool)
        if not len(rows):
            return out
        order = rows.argsort()
        ordered = rows[order]
        breaks = ((ordered[1:] != ordered[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
        with open(self.path, "rb") as f:
            for begin, end in zip([0, *breaks], [*breaks, len(rows)], strict=True):  # one read per run of rows
                first = int(ordered[begin])
                out[order[begin:end]] = self._read(f.fileno(), first, first + end - begin)
        return out

    def _read(self, fd: int, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} of a mask of {self.shape[0]}")
        seq = self.shape[1]
        if stop == start:
            return torch.zeros(0, seq, dtype=torch.bool)
        data = os.pread(fd, (stop - start) * seq, self.offset + start * seq)
        return torch.frombuffer(bytearray(data), dtype=torch.bool).view(stop - start, seq)

    def _scan(self) -> None:
        """Each row's any() and the count of True, in one pass a chunk at a time."""
        rows, parts = max(1, self.CHUNK_BYTES // self.shape[1]), [torch.zeros(0, dtype=torch.bool)]
        with open(self.path, "rb") as f:
            for start in range(0, self.shape[0], rows):
                chunk = self._read(f.fileno(), start, min(start + rows, self.shape[0]))
                parts.append(chunk.any(dim=1))
                self._count += int(chunk.count_nonzero())
        self._rows_any = torch.cat(parts)

    def any(self, dim: int) -> Tensor:
        if dim not in (1, -1):
            raise ValueError("a MaskFile reduces over its rows only (any(dim=1))")
        if self._rows_any is None:
            self._scan()
        return self._rows_any

    def count_nonzero(self) -> Tensor:
        if self._rows_any is None:
            self._scan()
        return torch.tensor(self._count)

    def all(self) -> Tensor:
        return torch.tensor(int(self.count_nonzero()) == self.numel())


def load_mask_shard(path: str | Path, saved_world: int, rank: int, world: int) -> Tensor:
    """Rank `rank` of `world`'s rows of the mask `saved_world` ranks wrote as shards of `path` (`shard_path`): its
    own file, memory-mapped, on as many ranks; else gathered from every shard in memory (1 byte per token)."""
    if saved_world == world:
        return load_mask(shard_path(path, rank, world))
    saved = [load_mask(shard_path(path, r, saved_world)) for r in range(saved_world)]
    wanted = shard_rows(sum(len(part) for part in saved), rank, world)
    mask = torch.empty(len(wanted), saved[0].shape[1], dtype=torch.bool)
    for r, part in enumerate(saved):
        picked = wanted % saved_world == r
        mask[picked] = part[wanted[picked] // saved_world]
    return mask


class ScratchFloats:
    """A (sequences, seq) float32 array in a file, written by rows (`scratch[rows] = values`) and read by slices of
    rows (`scratch[start:stop]`) with plain file reads and writes: its pages stay in the OS's page cache, never in
    this process's memory (a memory map's would count in its RSS as it is touched), whatever the file's size."""

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.shape, self.row_bytes = shape, 4 * shape[1]
        self.file = open(path, "r+b")  # noqa: SIM115 - closed by scratch_floats

    def __setitem__(self, rows: Tensor, values: Tensor) -> None:
        """Rows `rows` (ascending) set to `values` (len(rows), seq): one write per run of consecutive rows."""
        rows, values = rows.tolist(), values.float().contiguous().numpy()
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                self.file.seek(rows[start] * self.row_bytes)
                self.file.write(values[start:i].tobytes())
                start = i

    def __getitem__(self, index: slice) -> Tensor:
        start, stop, _ = index.indices(self.shape[0])
        self.file.seek(start * self.row_bytes)
        data = np.fromfile(self.file, dtype=np.float32, count=(stop - start) * self.shape[1])
        return torch.from_numpy(data).view(stop - start, self.shape[1])


@contextmanager
def scratch_floats(near: str | Path, shape: tuple[int, int]) -> Iterator[ScratchFloats]:
    """Float32 scratch space beside `near` (`ScratchFloats`, zeros until written), removed on exit: it grows with the
    data on disk, not in memory. Its blocks are reserved up front (a full disk is one error, not a SIGBUS), and a
    killed run's file is a stale temporary (`lego.atomic.remove_stale_temporaries`)."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=near.parent, prefix=f".{near.name}.scratch.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        reserve_space(tmp, 4 * shape[0] * shape[1], near)
        scratch = ScratchFloats(tmp, shape)
        try:
            yield scratch
        finally:
            scratch.file.close()
    finally:
        tmp.unlink(missing_ok=True)


# -- streaming to and from disk ------------------------------------------------------------------
_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}
_HEADER_BYTES = 4096  # fixed header room, so the header can be rewritten after the data


def _map_safetensors(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """Parse a safetensors header and memory-map every tensor (copy-on-write: the file is never changed)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.path.getsize(path) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(length))
    meta = json.loads(header.pop("__metadata__", {}).get("lego", "{}"))
    start, size, tensors = 8 + length, os.path.getsize(path), {}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        if start + end > size:
            raise ValueError(f"tensor {name} runs past the end of the file")
        dtype = _NUMPY[spec["dtype"]]
        count = int(np.prod(spec["shape"], dtype=np.int64))
        array = np.memmap(path, dtype=dtype, mode="c", offset=start + begin, shape=(count,))
        tensor = torch.from_numpy(array).view(*spec["shape"])
        tensors[name] = tensor.view(torch.bfloat16) if spec["dtype"] == "BF16" else tensor
    return meta, tensors


class HiddenStateWriter:
    """Writes a TrainingData file whose hidden states are filled in place, through a memory map, so the
    next stage's inputs are never held in memory whole. Use as a context manager:

        with HiddenStateWriter(path, sequences, seq_len, dim) as writer:
            writer.hidden[rows] = ...            # fill, in any order
            writer.finish(targets, active)        # writes the rest; the file appears atomically
    """

    def __init__(self, path: str | Path, sequences: int, seq_len: int, dim: int, dtype=torch.float32) -> None:
        self.path = Path(path)
        self.shape = (sequences, seq_len)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        hidden_bytes = sequences * seq_len * dim * torch.finfo(dtype).bits // 8
        tokens = sequences * seq_len
        self.layout = {  # name: (dtype, shape, begin, end); hidden first, 8-byte aligned
            "hidden_states": (_DTYPE_NAMES[dtype], [sequences, seq_len, dim], 0, hidden_bytes),
            "targets": ("I32", [sequences, seq_len], hidden_bytes, hidden_bytes + 4 * tokens),
            "active": ("BOOL", [sequences, seq_len], hidden_bytes + 4 * tokens, hidden_bytes + 5 * tokens),
        }
        self.tmp.touch()
        try:  # the whole file's blocks up front: a full disk is one error now, not a SIGBUS mid-write
            reserve_space(self.tmp, 8 + _HEADER_BYTES + hidden_bytes + 5 * tokens, self.path)
        except BaseException:
            self.tmp.unlink()
            raise
        np_dtype = _NUMPY[_DTYPE_NAMES[dtype]]
        array = np.memmap(
            self.tmp, dtype=np_dtype, mode="r+", offset=8 + _HEADER_BYTES, shape=(sequences * seq_len * dim,)
        )
        self._array = array
        hidden = torch.from_numpy(array).view(sequences, seq_len, dim)
        self.hidden = hidden.view(torch.bfloat16) if dtype == torch.bfloat16 else hidden

    def finish(self, targets: Tensor, active: Tensor) -> None:
        if targets.shape != self.shape or active.shape != self.shape:
            raise ValueError(f"targets/active must be {self.shape}")
        self._array.flush()
        meta = {
            "format": FORMAT, "sequences": self.shape[0], "seq_len": self.shape[1],
            "active_tokens": int(active.count_nonzero()), "dim": self.layout["hidden_states"][1][2],
        }  # fmt: skip
        header = {
            name: {"dtype": d, "shape": shape, "data_offsets": [b, e]} for name, (d, shape, b, e) in self.layout.items()
        }
        header["__metadata__"] = {"lego": json.dumps(meta)}
        blob = json.dumps(header).encode()
        if len(blob) > _HEADER_BYTES:
            raise ValueError("TrainingData header does not fit its reserved room")
        with open(self.tmp, "r+b") as f:
            f.write(struct.pack("<Q", _HEADER_BYTES) + blob.ljust(_HEADER_BYTES, b" "))
            for name, tensor in (("targets", targets.int()), ("active", active)):
                f.seek(8 + _HEADER_BYTES + self.layout[name][2])
                f.write(tensor.cpu().contiguous().numpy().tobytes())
        del self._array, self.hidden
        os.replace(self.tmp, self.path)

    def __enter__(self) -> HiddenStateWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():  # not finished: leave nothing behind
            self.tmp.unlink()
