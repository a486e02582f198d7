"""Read back what a run logged to W&B offline, from its `.wandb` transaction logs, with no W&B service or network.

For tests only: the transaction log is wandb's private format (LevelDB's log format around `wandb_internal_pb2`
records), which a wandb upgrade may change, so lego/ never reads it (tests/pipeline/test_tracking.py checks that);
the Tracker keeps its own record of what it logged.
"""

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FINISH_WAIT_SECONDS = 30.0


def read_offline_run(run_dir: str | Path, run_id: str | None = None, *, finished: bool = True) -> dict:
    """Read what a run logged from its `.wandb` transaction logs.

    `run_dir` may be a LEGO run directory or its `wandb/` folder (the folders of run `run_id` are read, by default
    those of the run written last, oldest folder first, merged as `wandb sync` uploads them), or one `offline-run-*`
    folder (that folder alone). Returns `{"config", "summary", "history", "tables", "images", "group", "name",
    "project", "tags", "job_type", "exit_code", "folders"}`: values decoded from their JSON, summary and history
    keys as logged (`block_0/exit_rate`), `tables`/`images` the keys under which tables/images were logged,
    `exit_code` None if the last folder's process never finished, `folders` how many folders were read.

    `finished`: first wait until the last folder's log holds its exit record. Offline, `run.finish` can return
    before wandb's service has written the log; pass False for a run whose process was killed (it never will).
    """
    logs = _run_logs(Path(run_dir), run_id)
    assert logs, f"no W&B run under {run_dir}"
    if finished:
        _wait_for_exit(logs[-1])
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "tags": [], "folders": len(logs)}
    run.update(dict.fromkeys(("group", "name", "project", "job_type", "exit_code")))
    for record in (record for log in logs for record in records(log)):
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


def records(path: Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of a transaction log (none while wandb has not written its header yet)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for data in _log_records(path.read_bytes() if path.is_file() else b"", path):
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def _wait_for_exit(log: Path) -> None:
    deadline = time.monotonic() + FINISH_WAIT_SECONDS
    while not any(record.WhichOneof("record_type") == "exit" for record in records(log)):
        assert time.monotonic() < deadline, f"W&B has not finished writing {log} after {FINISH_WAIT_SECONDS}s"
        time.sleep(0.05)


def _run_logs(path: Path, run_id: str | None = None) -> list[Path]:
    """The `.wandb` logs of one run under `path`, oldest folder first: run `run_id`'s, by default that of the log
    written last (`path` may also be one run folder)."""
    logs = [*path.glob("*.wandb"), *path.glob("*run-*/*.wandb"), *path.glob("wandb/*run-*/*.wandb")]
    if run_id is None and logs:
        run_id = log_run_id(max(logs, key=lambda log: log.stat().st_mtime_ns))
    # folders are named [offline-]run-<YYYYmmdd_HHMMSS>-<id>[-<n>]: the part after "run-" sorts by start time
    return sorted((log for log in logs if log_run_id(log) == run_id), key=lambda log: log.parent.name.split("run-")[1])


def log_run_id(log: Path) -> str:
    """The run id of a `run-<id>.wandb` transaction log."""
    return log.stem.removeprefix("run-")


# The .wandb transaction log uses LevelDB's log format: a 7-byte file header, then 32 KiB blocks of chunks, each
# with a header of (CRC32 of type byte + data, data length, chunk type); a record longer than a block's remainder
# is split into FIRST, MIDDLE..., LAST chunks, and a block tail shorter than a chunk header is zero padding.
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_records(data: bytes, path: Path) -> Iterator[bytes]:
    """The records of a LevelDB-format log; stops at a corrupt or torn chunk (a run killed mid-write)."""
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION), f"{path}: not a log this reads"
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
