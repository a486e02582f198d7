"""Corpus sources: turn a `DataConfig` into a `datasets.Dataset` of documents with one "text" column.

Every source goes through HF `datasets`, so its Arrow cache makes repeated loads cheap and its
fingerprint identifies the documents for our own caches. The embedded Austen corpus is unpacked once
from package data into the cache directory; nothing is downloaded unless `data.source=hf`.
"""

import contextlib
import glob
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets

from lego.data.config import DataConfig
from lego.errors import DataError

AUSTEN_ARCHIVE = Path(__file__).parent / "corpora" / "austen.tar.xz"

# File extension -> `datasets` builder, for data.format=auto.
_FORMAT_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def load_documents(data: DataConfig, cache_dir: Path, *, progress: bool = True) -> datasets.Dataset:
    """Load the configured corpus as a Dataset with a single string column "text", one row per document."""
    hf_cache = str(cache_dir / "datasets")
    with _progress_bars(progress):
        if data.source == "austen":
            files = _unpack_austen(cache_dir)
            ds = _load_files("text", files, hf_cache)
            return _text_column(ds, "text", "data.source")
        if data.source == "text_files":
            files = [f for f in _resolve_files(data.files) if os.path.getsize(f) > 0]  # no documents in them
            if not files:
                raise DataError("the corpus is empty: every file in data.files is empty")
            builder = data.format if data.format != "auto" else _detect_format(files)
            ds = _load_files(builder, files, hf_cache)
            return _text_column(ds, "text" if builder == "text" else data.text_column, "data.files")
        return _text_column(_load_hub(data, hf_cache), data.text_column, "data.name")


def _unpack_austen(cache_dir: Path) -> list[str]:
    """Extract the packaged novels once, into a directory named by the archive's hash."""
    digest = hashlib.sha256(AUSTEN_ARCHIVE.read_bytes()).hexdigest()[:16]
    target = cache_dir / "corpora" / f"austen-{digest}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".austen-"))
        try:
            with tarfile.open(AUSTEN_ARCHIVE) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
            with contextlib.suppress(OSError):  # another process may have won the race; its copy is equal
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(str(p) for p in target.glob("*.txt"))


def _resolve_files(patterns: list[str]) -> list[str]:
    """Expand paths and globs in order, failing on any pattern that matches no file."""
    files: list[str] = []
    for pattern in patterns:
        matches = [m for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise DataError(f"data.files: no file matches {pattern!r}; check the path")
        files.extend(os.path.abspath(m) for m in matches)
    return list(dict.fromkeys(files))


def _detect_format(files: list[str]) -> str:
    formats = set()
    for file in files:
        fmt = _FORMAT_BY_EXTENSION.get(Path(file).suffix.lower())
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {file!r} from its extension; set data.format=text, json or parquet"
            )
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(f"data.files mixes formats ({', '.join(sorted(formats))}); load one format at a time")
    return formats.pop()


def _load_files(builder: str, files: list[str], hf_cache: str) -> datasets.Dataset:
    """Load local files with a packaged `datasets` builder; a whole .txt file is one document."""
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **kwargs)
    except Exception as e:  # datasets wraps reader errors in several exception types
        if any(isinstance(c, UnicodeDecodeError) for c in _causes(e)):
            bad = next((f for f in files if not _is_utf8(f)), files[0])
            raise DataError(f"{bad!r} is not valid UTF-8 text; convert it or remove it from data.files") from e
        raise DataError(
            f"could not read data.files as {builder}: {_reason(list(_causes(e))[-1])}; "
            "check the files or set data.format"
        ) from e


def _load_hub(data: DataConfig, hf_cache: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(data.name, data.config_name, split=data.split, cache_dir=hf_cache)
    except Exception as e:  # offline, unknown name, bad config or split: all mean "cannot use it"
        raise DataError(
            f"could not load hub dataset {data.name!r} (config {data.config_name!r}, split "
            f"{data.split!r}): {_reason(e)}; check data.name/data.config_name/data.split and "
            "the network, or use a local corpus (data=austen or data=text_files)"
        ) from e


def _text_column(ds: datasets.Dataset, column: str, key: str) -> datasets.Dataset:
    """Keep only the text column, named "text", after checking it exists and holds strings."""
    if len(ds) == 0:
        raise DataError(f"the corpus is empty (0 rows); check {key}")
    if column not in ds.column_names:
        raise DataError(
            f"data.text_column={column!r} is not a column of the corpus (columns: "
            f"{', '.join(ds.column_names)}); set data.text_column"
        )
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"data.text_column={column!r} holds {ds.features[column]}, not text; "
            "set data.text_column to a string column"
        )
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _is_utf8(file: str) -> bool:
    try:
        with open(file, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError:
        return False
    return True


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = e
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _reason(e: BaseException) -> str:
    """An exception as one short line, so our error messages stay one line."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence `datasets`' own progress bars for quiet runs, restoring the global setting afterwards."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
