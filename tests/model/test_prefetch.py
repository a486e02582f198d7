"""The prefetching batches (`lego.training.prefetch`): made in a background thread in the same order, an error
raised in its place, the thread stopped when the consumer stops; on the CPU the batches pass through untouched."""

import threading

import pytest
import torch

from lego import TrainingData
from lego.training.prefetch import background, prefetch


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "lego-prefetch"]


def test_items_are_made_in_a_background_thread_in_their_order():
    made_in = []

    def prepare(item: int) -> int:
        made_in.append(threading.current_thread())
        return item * 10

    assert list(background(range(7), prepare)) == [0, 10, 20, 30, 40, 50, 60]
    assert threading.main_thread() not in made_in and len(set(made_in)) == 1
    assert not prefetch_threads()


def test_an_error_while_making_an_item_is_raised_in_its_place():
    def items():
        yield from range(3)
        raise KeyError("item 3")

    got = []
    with pytest.raises(KeyError, match="item 3"):
        for item in background(items()):
            got.append(item)
    assert got == [0, 1, 2] and not prefetch_threads()


def test_a_consumer_that_stops_early_stops_the_thread():
    made = []
    items = background(iter(range(1000)), lambda i: made.append(i) or i, depth=2)
    assert [next(items), next(items)] == [0, 1]
    items.close()
    assert not prefetch_threads() and len(made) <= 5  # two taken, at most depth + 1 made ahead


def test_on_the_cpu_the_batches_pass_through_in_the_calling_thread():
    windows = torch.randint(0, 50, (10, 9), generator=torch.Generator().manual_seed(0))
    data = TrainingData.from_windows(windows)
    batches = data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))
    want = list(data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    got = list(prefetch(batches, torch.device("cpu")))
    assert len(got) == len(want) == 4 and not prefetch_threads()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


@pytest.mark.cuda
def test_on_cuda_the_batches_come_pinned_and_unchanged():
    data = TrainingData(torch.randn(6, 5, 4), torch.randint(0, 9, (6, 5)), torch.rand(6, 5) < 0.5)
    want = list(data.batches(4))
    got = list(prefetch(data.batches(4), torch.device("cuda")))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.hidden_states.is_pinned() and a.active.is_pinned()
        assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.active, b.active)


@pytest.mark.cuda
def test_a_batch_already_on_the_device_is_left_there():
    """A streamed batch's hidden states are made on the GPU by the frozen blocks: pinning leaves them there."""
    from lego.training.prefetch import pin

    batch = TrainingData(torch.randn(2, 5, 4, device="cuda"), torch.randint(0, 9, (2, 5)), torch.rand(2, 5) < 0.5)
    pinned = pin(batch)
    assert pinned.hidden_states.is_cuda and pinned.targets.is_pinned()
