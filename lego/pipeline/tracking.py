"""Weights & Biases logging for one run, offline by default so it needs no account and no network.

Everything W&B writes lands under the run directory: `<run_dir>/wandb/offline-run-<time>-<id>/` holds the
transaction log (`run-<id>.wandb`), the media files (plots, the exit-stats table) and, in offline mode, the
staging copy of the table artifact, so the run folder alone is enough to upload it later with

    wandb sync <run_dir>/wandb/

One run directory is one W&B run: its id is kept in `<run_dir>/wandb/run_id`, and a resumed run continues it
(`resume="allow"`). Offline, wandb still starts a new `offline-run-*` folder per process, all with that id;
`wandb sync` (0.31, as installed) uploads the folders of one run one after another, oldest first, as that one
run. So that the merged history holds every row once, a resumed Tracker reads what the earlier folders logged,
numbers its rows after theirs and skips the rows they already hold (the steps between an interrupted stage's
last checkpoint and the kill, which the resumed stage trains again).

Users with an account use `wandb.mode=online`; `wandb.mode=disabled` turns logging off entirely (no wandb folder).
`read_offline_run` reads a run back from its transaction log without any W&B service, for tests and for scripts.

`import wandb` is deferred to `Tracker.__init__`: it takes about a second and a disabled run never needs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lego.atomic import atomic_write
from lego.errors import ConfigError, DataError

MODES = ("offline", "online", "disabled")
FINISH_WAIT_SECONDS = 30.0
# A private wandb setting (15 s by default in 0.31); a wandb without it keeps its own flushing.
FLUSH_SETTING, FLUSH_SECONDS = "x_transaction_log_flush_interval", 1.0
RUN_ID_FILE = "run_id"  # under <run_dir>/wandb/: the W&B run id of the run directory
_STAGE_STEP = re.compile(r"stage_\d+/step")  # a stage's step axis (Tracker.log_step)

# Top-level results lists that hold one value per block, and the per-block summary field each becomes.
PER_BLOCK_LISTS = {"exit_counts": "exit_count", "exit_rates": "exit_rate"}

MOE_FIELDS = ("imbalance", "entropy", "dropped", "tokens")  # per MoE layer, beside its expert load


class Tracker:
    """Logs one run to W&B: per-stage training curves, stage summaries, final exit stats, tables and plots.

    Use it as a context manager: `finish` then runs on every exit path, with exit code 1 when an exception
    escapes, so a failed job is marked failed and the next job of a multirun in the same process gets a run
    of its own instead of logging into this one.
    """

    def __init__(
        self,
        *,
        run_dir: str | Path,
        config: dict,
        mode: str = "offline",
        project: str = "lego",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"wandb.mode={mode!r} must be one of {', '.join(MODES)}")
        self.mode = mode
        self._run: Any = None
        self._offline_dir: Path | None = None
        self._stage_steps: dict[int, int] = {}
        self._logged: set[tuple[str, Any]] = set()  # (key, stage step or None) the run's earlier folders hold
        self._next_step = 0  # the W&B step of the next history row
        if mode == "disabled":
            return

        import wandb

        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb looks for the git root here before creating it
        run_id = _run_id(run_dir / "wandb")
        if _run_logs(run_dir / "wandb", run_id):
            earlier = read_offline_run(run_dir / "wandb", run_id)
            self._logged = {(key, _position(row)) for row in earlier["history"] for key in row}
            self._next_step = 1 + max((row.get("_step", -1) for row in earlier["history"]), default=-1)
        # A killed process loses what wandb has not flushed to the transaction log yet: flush every second, so
        # that a resumed run finds, and need not log again, all but the last second of it.
        flush = FLUSH_SETTING in getattr(wandb.Settings, "model_fields", {})
        settings = wandb.Settings(
            silent=True,  # no banner or sync hints; failures surface as our one-line errors
            console="off",  # leave stdout to tqdm and Hydra's own log file
            reinit="create_new",  # never hand back (or finish) a run some other code left open
            **({FLUSH_SETTING: FLUSH_SECONDS} if flush else {}),
        )
        try:
            self._run = wandb.init(
                dir=run_dir,
                id=run_id,
                resume="allow",
                mode=mode,
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=tags,
                job_type=job_type,
                config=config,
                settings=settings,
            )
        except Exception as error:
            if mode == "offline":
                raise
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(
                f"wandb.mode=online could not start a W&B run ({reason}); run `wandb login` or use wandb.mode=offline"
            ) from error
        self._offline_dir = Path(self._run.dir).parent  # run.dir is the run folder's files/ subfolder
        self._next_step = max(self._next_step, self._run.step)  # online, a resumed run starts after the server's

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)

    @property
    def offline_dir(self) -> Path | None:
        """The local W&B run folder under `run_dir/wandb/` (what `wandb sync` takes), None when disabled."""
        return self._offline_dir

    def log_step(self, stage: int, metrics: dict[str, float]) -> None:
        """Log one row of a stage's training curves against that stage's own step counter.

        Each stage restarts its step count, so one global step axis would misplace every stage after the first;
        `define_metric` gives each `stage_<k>/*` panel its `stage_<k>/step` x-axis instead.
        """
        if self._run is None:
            return
        prefix = f"stage_{stage}/"
        if stage not in self._stage_steps:
            self._run.define_metric(f"{prefix}step")
            self._run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
            self._stage_steps[stage] = 0
        step = metrics.get("step", self._stage_steps[stage] + 1)
        self._stage_steps[stage] = step
        row = {f"{prefix}{key}": value for key, value in metrics.items() if key != "step"}
        self._log({**row, f"{prefix}step": step}, f"{prefix}step")

    def log_stage_end(self, stage: int, stats: dict) -> None:
        """Record a finished stage's scalars (hard-token count, threshold, best val PPL, ...) as summary values.

        None (e.g. the last block's threshold) and nested values (the eval curve, already logged per step) are skipped.
        """
        if self._run is None:
            return
        self._run.summary.update({f"stage_{stage}/{key}": value for key, value in stats.items() if _is_number(value)})

    def log_final(self, results: dict, images: dict[str, str | Path]) -> None:
        """Log the run's results: scalars and per-block exit stats as summary, the `exit_stats` table, the plots.

        MoE runs add the `moe_expert_load` table (layer, expert, share of the routed test slots) and per-layer
        summary values `moe/<layer>/<imbalance|entropy|dropped|tokens>`; the heatmap is the expert_load plot.
        Summary values make runs comparable in the W&B runs table (one column per `block_<k>/<field>`); the table
        keeps the per-block rows together for one run. NaN (e.g. the PPL of a block no token exited at) is logged
        as-is and shows as empty. Plots are logged as `plots/<name>`; missing image files are skipped.
        """
        if self._run is None:
            return
        import wandb

        summary = {key: value for key, value in results.items() if _is_number(value)}
        for list_key, field in PER_BLOCK_LISTS.items():
            for k, value in enumerate(results.get(list_key) or []):
                if _is_number(value):
                    summary[f"block_{k}/{field}"] = value
        blocks = results.get("blocks") or []
        for index, block in enumerate(blocks):
            k = block.get("block", index)
            numbers = {field: value for field, value in block.items() if field != "block" and _is_number(value)}
            summary.update({f"block_{k}/{field}": value for field, value in numbers.items()})
        moe = results.get("moe") or []
        for row in moe:  # `moe/block1.layer0/imbalance`: comparable across runs in the runs table
            summary.update({f"moe/{row['layer']}/{field}": row[field] for field in MOE_FIELDS})
        self._run.summary.update(summary)

        media: dict[str, Any] = {}
        if moe:  # one row per (layer, expert): W&B's own bar charts and heatmaps group by layer
            rows = [
                [row["layer"], e, share, *(row[f] for f in MOE_FIELDS)]
                for row in moe
                for e, share in enumerate(row["load"])
            ]
            media["moe_expert_load"] = wandb.Table(columns=["layer", "expert", "load", *MOE_FIELDS], data=rows)
        if blocks:
            # Only scalar columns: the nested per-eval curves of a block are in the training_curves plot.
            columns = list(dict.fromkeys(key for block in blocks for key, value in block.items() if _is_scalar(value)))
            rows = [[block.get(column) for column in columns] for block in blocks]
            media["exit_stats"] = wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        for name, path in images.items():
            if Path(path).is_file():
                media[f"plots/{name}"] = wandb.Image(str(path))
        if media:
            with self._artifact_staging():
                self._log(media, None)

    def _log(self, row: dict, axis: str | None) -> None:
        """Log `row` as the run's next history row, minus what the run's earlier folders already hold at the same
        place: a stage's step (`axis` names the stage's step key, whose value in `row` is the step) or, for rows
        without an axis (the final media), anywhere outside the stages."""
        position = (axis, row[axis]) if axis else None
        new = {key: value for key, value in row.items() if key != axis and (key, position) not in self._logged}
        if not new:
            return
        if axis:
            new[axis] = row[axis]
        self._run.log(new, step=self._next_step, commit=True)  # commit: a row is written now, not with the next
        self._next_step += 1

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent); exit code 1 marks it failed in W&B.

        In offline mode `run.finish` returns before wandb's service has written the transaction log (it is
        buffered until the run's stream closes), so this waits until the log holds the run's exit record: a
        caller that reads or syncs the run folder next, or a test, then sees everything that was logged.
        """
        run, self._run = self._run, None
        if run is None:
            return
        run.finish(exit_code=exit_code)
        if self.mode != "offline":
            return  # online, wandb has uploaded everything by now; nobody reads the local log right away
        log = self._offline_dir / f"run-{run.id}.wandb"
        deadline = time.monotonic() + FINISH_WAIT_SECONDS
        while not any(record.WhichOneof("record_type") == "exit" for record in _records(log)):
            if time.monotonic() > deadline:
                warnings.warn(f"W&B has not finished writing {log} after {FINISH_WAIT_SECONDS}s", stacklevel=2)
                return
            time.sleep(0.05)

    @contextmanager
    def _artifact_staging(self) -> Iterator[None]:
        """Stage table artifacts inside the offline run folder instead of ~/.local/share/wandb.

        `wandb sync` uploads a table from its staged copy, so staging it elsewhere would leave the run folder
        incomplete. wandb reads the location from WANDB_DATA_DIR when the table is logged; the previous value
        is restored so nothing else in the process is affected.
        """
        if self.mode != "offline" or self._offline_dir is None:
            yield
            return
        previous = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(self._offline_dir / "data")
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("WANDB_DATA_DIR", None)
            else:
                os.environ["WANDB_DATA_DIR"] = previous


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


# --- Reading an offline run back -------------------------------------------------------------------------------------

# The .wandb transaction log uses LevelDB's log format: a 7-byte file header, then 32 KiB blocks of chunks, each
# with a header of (CRC32 of type byte + data, data length, chunk type); a record longer than a block's remainder
# is split into FIRST, MIDDLE..., LAST chunks, and a block tail shorter than a chunk header is zero padding.
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_offline_run(run_dir: str | Path, run_id: str | None = None) -> dict:
    """Read what a run logged from its `.wandb` transaction logs, without a W&B service or network.

    `run_dir` may be a LEGO run directory or its `wandb/` folder (the folders of run `run_id` are read, by default
    those of the run written last, oldest folder first, merged as `wandb sync` uploads them), or one `offline-run-*`
    folder (that folder alone). Returns `{"config", "summary", "history", "tables", "images", "group", "name",
    "project", "tags", "job_type", "exit_code", "folders"}`: values decoded from their JSON, summary and history
    keys as logged (`block_0/exit_rate`), `tables`/`images` the keys under which tables/images were logged,
    `exit_code` None if the last folder's process never finished, `folders` how many folders were read.
    """
    logs = _run_logs(Path(run_dir), run_id)
    if not logs:
        raise DataError(f"no W&B run under {run_dir} (was it run with wandb.mode=disabled?)")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "tags": [], "folders": len(logs)}
    run.update(dict.fromkeys(("group", "name", "project", "job_type", "exit_code")))
    for record in (record for log in logs for record in _records(log)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(run["config"], record.run.config.update, record.run.config.remove)
            run.update(
                group=record.run.run_group or None,
                name=record.run.display_name or None,
                project=record.run.project or None,
                tags=list(record.run.tags),
                job_type=record.run.job_type or None,
                exit_code=None,  # a new process: its own exit record, if it got to write one
            )
        elif kind == "config":
            _apply(run["config"], record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(run["summary"], record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item, [])
            run["history"].append(row)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    run["config"].pop("_wandb", None)  # wandb's own bookkeeping, not the run's config
    logged = [run["summary"], *run["history"]]
    run["tables"] = sorted({key for row in logged for key, value in row.items() if "table" in _media_type(value)})
    run["images"] = sorted({key for row in logged for key, value in row.items() if _media_type(value) == "image-file"})
    return run


def _run_id(wandb_dir: Path) -> str:
    """The W&B run id of a run directory: read from `wandb/run_id`, or made (8 characters in [a-z0-9], as wandb's
    own) and written there atomically."""
    path = wandb_dir / RUN_ID_FILE
    if not path.is_file():
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        atomic_write(path, lambda tmp: tmp.write_text(f"{run_id}\n"))
        return run_id
    run_id = path.read_text().strip()
    if not re.fullmatch(r"[\w.-]+", run_id):
        raise DataError(f"{path} holds {run_id!r}, not a W&B run id; delete the file to log to a new W&B run")
    return run_id


def _run_logs(path: Path, run_id: str | None = None) -> list[Path]:
    """The `.wandb` logs of one run under `path`, oldest folder first: run `run_id`'s, by default that of the log
    written last (`path` may also be one run folder)."""
    logs = [*path.glob("*.wandb"), *path.glob("*run-*/*.wandb"), *path.glob("wandb/*run-*/*.wandb")]
    if run_id is None and logs:
        run_id = _log_run_id(max(logs, key=lambda log: log.stat().st_mtime_ns))
    # folders are named [offline-]run-<YYYYmmdd_HHMMSS>-<id>[-<n>]: the part after "run-" sorts by start time
    return sorted((log for log in logs if _log_run_id(log) == run_id), key=lambda log: log.parent.name.split("run-")[1])


def _log_run_id(log: Path) -> str:
    return log.stem.removeprefix("run-")


def _position(row: dict) -> tuple[str, Any] | None:
    """Where a history row sits: its stage's step key and step (`("stage_1/step", 40)`), None outside the stages."""
    axis = next((key for key in row if _STAGE_STEP.fullmatch(key)), None)
    return (axis, row[axis]) if axis else None


def _records(path: Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of a transaction log (none while wandb has not written its header yet)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for data in _log_records(path.read_bytes() if path.is_file() else b"", path):
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def _log_records(data: bytes, path: Path) -> Iterator[bytes]:
    """The records of a LevelDB-format log; stops at a corrupt or torn chunk (a run killed mid-write)."""
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic) != (_FILE_IDENT, _FILE_MAGIC) or version != _FILE_VERSION:
        raise DataError(f"{path} is not a W&B transaction log this version of LEGO can read")
    position, pending = _FILE_HEADER.size, b""
    while position + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - position % _BLOCK < _CHUNK_HEADER.size:
            position += _BLOCK - position % _BLOCK
            continue
        checksum, length, chunk_type = _CHUNK_HEADER.unpack_from(data, position)
        start = position + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        position = start + length
        if chunk_type == 0 and length == 0:  # zero padding at the end of a block
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([chunk_type]))) != checksum:
            return
        if chunk_type == _FULL:
            yield chunk
        elif chunk_type == _FIRST:
            pending = chunk
        elif chunk_type == _MIDDLE:
            pending += chunk
        elif chunk_type == _LAST:
            yield pending + chunk
            pending = b""


def _apply(target: dict, updates, removes) -> None:
    """Apply config/summary/history items, whose key is `key` or a `nested_key` path, to a nested dict."""
    for item in updates:
        *parents, leaf = _item_path(item)
        node = target
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _item_value(item)
    for item in removes:
        *parents, leaf = _item_path(item)
        node = target
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)


def _item_path(item) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _item_value(item) -> Any:
    """An item's value: JSON in `value_json`, or (history items of newer wandb versions) a typed field."""
    typed = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if typed == "none":
        return None
    if typed == "json":
        return json.loads(item.json)
    if typed is not None:
        return getattr(item, typed)
    return json.loads(item.value_json)


def _media_type(value: Any) -> str:
    return value.get("_type", "") if isinstance(value, dict) else ""
