"""TrainingData: what one stage hands the next — hidden states, targets and the mask of hard tokens.

Block 0 starts from token ids (`TrainingData.from_windows`); every later block from the hidden states
the previous block produced, where tokens that are not hard were kept unchanged. Saved with
safetensors plus a small JSON header so a stage's dump can be inspected and reloaded without pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lego.atomic import atomic_write
from lego.errors import DataError

FORMAT = "lego.TrainingData/1"


@dataclass
class TrainingData:
    """`hidden_states` (sequences, seq, dim) float, or `input_ids` (sequences, seq) int64 for Block 0;
    `targets` (sequences, seq) int64; `active` (sequences, seq) bool, the tokens the next block trains on.

    `len(data)` is the number of active tokens.
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
        if self.active.dtype != torch.bool or self.targets.dtype != torch.long:
            raise ValueError(f"active must be bool and targets int64, got {self.active.dtype}, {self.targets.dtype}")
        inputs = self.inputs
        if inputs.shape[:2] != self.targets.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} do not match targets {tuple(self.targets.shape)}")
        if self.hidden_states is not None and (
            self.hidden_states.dim() != 3 or not self.hidden_states.is_floating_point()
        ):
            raise ValueError("hidden_states must be a float tensor (sequences, seq, dim)")

    @classmethod
    def from_windows(cls, windows: Tensor) -> TrainingData:
        """Token windows (sequences, seq + 1) -> Block 0's data: inputs w[:, :-1], targets w[:, 1:]."""
        windows = windows.long()
        return cls(
            hidden_states=None,
            targets=windows[:, 1:].contiguous(),
            active=torch.ones(windows.shape[0], windows.shape[1] - 1, dtype=torch.bool),
            input_ids=windows[:, :-1].contiguous(),
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
        return int(self.active.sum())

    def select(self, rows: Tensor) -> TrainingData:
        """The sequences at `rows` (an index tensor or bool mask)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrainingData(pick(self.hidden_states), self.targets[rows], self.active[rows], pick(self.input_ids))

    def to(self, device: torch.device | str) -> TrainingData:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainingData(move(self.hidden_states), move(self.targets), move(self.active), move(self.input_ids))

    # -- iteration -------------------------------------------------------------------------------
    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[TrainingData]:
        """Batches of whole sequences (attention needs the context), skipping sequences with no active
        token: they would cost compute and contribute no loss."""
        rows = self.active.any(dim=1).nonzero().squeeze(1)
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(rows), batch_size):
            yield self.select(rows[start : start + batch_size])

    def num_batches(self, batch_size: int) -> int:
        return -(-int(self.active.any(dim=1).sum()) // batch_size)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """Random split by whole sequences (never by token, which would leak context)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        order = torch.randperm(self.num_sequences, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(self.num_sequences * val_fraction)))
        return self.select(order[n_val:].sort().values), self.select(order[:n_val].sort().values)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic write: a temp file renamed into place, so a kill never leaves a half file behind."""
        path = Path(path)
        tensors = {"targets": self.targets.contiguous(), "active": self.active.contiguous()}
        if self.hidden_states is not None:
            tensors["hidden_states"] = self.hidden_states.contiguous()
        else:
            tensors["input_ids"] = self.input_ids.contiguous()
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
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TrainingData:
        """Load and validate a file written by `save`; a truncated, foreign or inconsistent file is a
        `DataError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"TrainingData file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = json.loads((f.metadata() or {}).get("lego", "{}"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
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
