"""Batches made ahead of the device: while CUDA computes a step, a background thread gathers the next batch
(`TrainingData.select`: indexing, widening token ids, reading a memory-mapped dump) and copies it into pinned
memory, so that its copy to the device (`non_blocking=True` in `lego.training.propagation.block_input` and the
methods' steps) overlaps with the computation instead of stalling it.

On the CPU there is nothing to overlap (the same cores would do both), so `prefetch` hands the batches on as they
come, in the calling thread: the CPU's batches, order and numbers stay exactly as without it.

Depends on torch only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import TypeVar

import torch

from lego.training_data import TrainingData

T = TypeVar("T")
DEPTH = 2  # batches made ahead: one in flight to the device, one being gathered
_END = object()


class _Failed:
    """What the thread hands on when making an item raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(batches: Iterable[TrainingData], device: torch.device | str) -> Iterator[TrainingData]:
    """`batches` for a loop training on `device`: on CUDA made `DEPTH` ahead in a background thread and pinned;
    elsewhere as they come."""
    if torch.device(device).type != "cuda":
        return iter(batches)
    return background(batches, pin)


def pin(batch: TrainingData) -> TrainingData:
    """`batch` with its CPU tensors in pinned (page-locked) memory, so their copy to a CUDA device can be
    asynchronous; tensors already on the device (a streamed batch's hidden states, made there by the frozen
    blocks) stay as they are."""
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return TrainingData(**{name: t.pin_memory() if t is not None and t.device.type == "cpu" else t
                           for name, t in moved.items()})  # fmt: skip


def background(items: Iterable[T], prepare: Callable[[T], T] | None = None, depth: int = DEPTH) -> Iterator[T]:
    """The items of `items`, each passed through `prepare`, made in a background thread at most `depth` ahead of
    the consumer, in their order. An exception raised while making an item is raised here, in its place; when the
    consumer stops early (`break`, an error, `close()`), the thread stops after the item it is making."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(prepare(item) if prepare else item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(err))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="lego-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
