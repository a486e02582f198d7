"""Corpus sources: turn a `DataConfig` into a `datasets` dataset of documents with one "text" column.

Every source goes through HF `datasets`, so its Arrow cache makes repeated loads cheap and its
fingerprint identifies the documents for our own caches. With `data.streaming=true` the dataset is an
`IterableDataset` read as a stream instead (no Arrow copy on disk), identified by its settings and its local
files' sizes and times. The embedded Austen corpus is unpacked once from package data into the cache
directory; nothing is downloaded unless `data.source=hf`.
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
import pyarrow as pa

from lego.data.cache import cache_key
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


Documents = datasets.Dataset | datasets.IterableDataset


def load_documents(data: DataConfig, cache_dir: Path, *, progress: bool = True) -> tuple[Documents, str]:
    """Load the configured corpus as a dataset with a single string column "text", one row per document, and
    the fingerprint that identifies its content for our caches."""
    hf_cache = str(cache_dir / "datasets")
    with _progress_bars(progress):
        if data.source == "austen":
            files = _unpack_austen(cache_dir)
            ds = _text_column(_load_files("text", files, hf_cache, data.streaming), "text", "data.source")
        elif data.source == "text_files":
            files = [f for f in _resolve_files(data.files) if os.path.getsize(f) > 0]  # no documents in them
            if not files:
                raise DataError("the corpus is empty: every file in data.files is empty")
            builder = data.format if data.format != "auto" else _detect_format(files)
            ds = _load_files(builder, files, hf_cache, data.streaming)
            ds = _text_column(ds, "text" if builder == "text" else data.text_column, "data.files")
        else:
            files = _local_files(data.files)
            ds = _text_column(_load_hub(data, files, hf_cache), data.text_column, "data.name")
    return ds, _fingerprint(ds, data, files)


READ_CHARS = 1 << 23  # about how many characters iter_texts reads at a time


def iter_texts(documents: Documents, read_chars: int = READ_CHARS) -> Iterator[str | None]:
    """The documents' texts in order, never the whole corpus in memory: a stream row by row, a dataset a slice of
    rows at a time, sized from the last slice's characters to about `read_chars` (a fixed number of rows would be
    the whole corpus when its documents are books)."""
    with _reading():
        if isinstance(documents, datasets.IterableDataset):
            for row in documents:
                yield row["text"]
            return
        start, rows = 0, 64
        while start < len(documents):
            texts = documents[start : start + rows]["text"]
            yield from texts
            start += len(texts)
            chars = sum(len(text or "") for text in texts)
            rows = max(1, min(4 * rows, rows * read_chars // max(chars, 1)))


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Errors of the rows read inside as one-line DataErrors: json and parquet readers let invalid UTF-8 through to
    here, and a stream reads its files only when iterated."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        bad_text = next((c for c in _causes(e) if isinstance(c, UnicodeDecodeError)), None)
        if bad_text is not None:
            raise DataError(
                f"the corpus contains text that is not valid UTF-8 ({bad_text.reason} at byte {bad_text.start} of "
                "a row); convert or remove the offending file in data.files"
            ) from e
        raise DataError(
            f"could not read the corpus: {_reason(list(_causes(e))[-1])}; check data.files or data.format"
        ) from e


def _fingerprint(ds: Documents, data: DataConfig, files: list[str]) -> str:
    """`datasets`' own fingerprint of a loaded dataset (how it identifies the content in its cache); a stream has
    none, so it is named by its settings and every local file's path, size and modification time."""
    if isinstance(ds, datasets.Dataset):
        return ds._fingerprint
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    settings = (data.source, data.name, data.config_name, data.split, data.format, data.text_column, data.files)
    return cache_key("stream", *settings, stats)


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


def _local_files(patterns: list[str]) -> list[str]:
    """data.files of a hub dataset: the patterns that match local files, resolved (the others name files in the
    dataset's repository and go to `datasets` as they are)."""
    local = [p for p in patterns if glob.glob(os.path.expanduser(p), recursive=True)]
    return _resolve_files(local) if local == patterns else []


def _load_files(builder: str, files: list[str], hf_cache: str, streaming: bool) -> Documents:
    """Load local files with a packaged `datasets` builder; a whole .txt file is one document, written to the Arrow
    cache 16 at a time (the default, 1000 rows, held a corpus of books whole in memory while writing it)."""
    kwargs = {"sample_by": "document", **({} if streaming else {"writer_batch_size": 16})} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=hf_cache, streaming=streaming, **kwargs
        )
    except Exception as e:  # datasets wraps reader errors in several exception types
        if any(isinstance(c, UnicodeDecodeError) for c in _causes(e)):
            bad = next((f for f in files if not _is_utf8(f)), files[0])
            raise DataError(f"{bad!r} is not valid UTF-8 text; convert it or remove it from data.files") from e
        raise DataError(
            f"could not read data.files as {builder}: {_reason(list(_causes(e))[-1])}; "
            "check the files or set data.format"
        ) from e


def _load_hub(data: DataConfig, files: list[str], hf_cache: str) -> Documents:
    try:
        return datasets.load_dataset(
            data.name,
            data.config_name,
            data_files=files or data.files or None,
            split=data.split,
            cache_dir=hf_cache,
            streaming=data.streaming,
        )
    except Exception as e:  # offline, unknown name, bad config or split: all mean "cannot use it"
        raise DataError(
            f"could not load hub dataset {data.name!r} (config {data.config_name!r}, split "
            f"{data.split!r}): {_reason(e)}; check data.name/data.config_name/data.split and "
            "the network, or use a local corpus (data=austen or data=text_files)"
        ) from e


def _text_column(ds: Documents, column: str, key: str) -> Documents:
    """Keep only the text column, named "text", after checking it exists and holds strings."""
    features = _features(ds)
    if features is None:
        raise DataError(f"the corpus is empty (0 rows); check {key}")
    if column not in features:
        raise DataError(
            f"data.text_column={column!r} is not a column of the corpus (columns: "
            f"{', '.join(features)}); set data.text_column"
        )
    dtype = getattr(features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"data.text_column={column!r} holds {features[column]}, not text; set data.text_column to a string column"
        )
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _features(ds: Documents) -> datasets.Features | None:
    """The columns and their types, None when there are no rows; a stream that does not declare them (the text
    builder's) shows them in its first row."""
    if isinstance(ds, datasets.Dataset):
        return ds.features if len(ds) else None
    if ds.features is not None:
        return ds.features
    with _reading():
        first = next(iter(ds), None)
    return None if first is None else datasets.Features.from_arrow_schema(pa.Table.from_pylist([first]).schema)


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
