"""Hard-token selection and threshold calibration: which tokens the next block trains on, and the exit threshold
that lets about `1 - hard_ratio` of the tokens reaching a block leave there.

Under torch.distributed the hard tokens are the bottom `hard_ratio` of all ranks' active tokens, chosen by the same
`topk` over the gathered confidences in global token order, so with the same block they are exactly the tokens a
single process would choose; each rank keeps (and writes) its own.

`select_hard_chunked` (the streamed hand-off, `trainer.dump=stream`) chooses as many tokens in memory independent of
their number: a radix select over the confidences' float32 bits, read a chunk at a time, with histograms summed over
the ranks. Its set is `topk`'s wherever the confidences at the cut differ; among equal ones it takes the lowest token
index (which of them `topk` takes is up to its implementation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lego import distributed


def select_hard(confidence: Tensor, active: Tensor, hard_ratio: float) -> Tensor:
    """The bottom `hard_ratio` of the active tokens by confidence, as a new (sequences, seq) mask.

    By ratio, not by threshold: exactly `int(n_active * hard_ratio)` tokens, whatever the confidences.
    Under torch.distributed, `confidence` and `active` are this rank's shard and the ratio is global
    (`_select_hard_global`). `active` may be a `MaskFile` (a streamed stage resumed with a dump): read whole.
    """
    active = active[:]
    if distributed.world()[1] > 1:
        return _select_hard_global(confidence, active, hard_ratio)
    flat_active = active.reshape(-1).nonzero().squeeze(1)
    n_hard = int(len(flat_active) * hard_ratio)
    chosen = torch.topk(confidence.reshape(-1)[flat_active], n_hard, largest=False).indices
    hard = torch.zeros(active.numel(), dtype=torch.bool)
    hard[flat_active[chosen]] = True
    return hard.view_as(active)


def _select_hard_global(confidence: Tensor, active: Tensor, hard_ratio: float) -> Tensor:
    """This rank's share of the bottom `hard_ratio` of every rank's active tokens.

    Every rank gathers all active tokens' confidences with their global flat positions (local sequence
    i is global sequence `i * world + rank`, see `shard_rows`), sorts them into global token order and
    runs the same `topk` as a single process would on the whole data: identical input, identical choice,
    ties included. Costs 12 bytes per active token on every rank.
    """
    rank, world = distributed.world()
    seq_len = active.shape[1]
    local = active.reshape(-1).nonzero().squeeze(1)
    global_seq = (local // seq_len) * world + rank
    positions = torch.cat(distributed.all_gather_variable(global_seq * seq_len + local % seq_len))
    values = torch.cat(distributed.all_gather_variable(confidence.reshape(-1)[local].float()))
    order = positions.argsort()
    positions, values = positions[order], values[order]
    n_hard = int(len(values) * hard_ratio)
    chosen = positions[torch.topk(values, n_hard, largest=False).indices]
    seq = chosen // seq_len
    mine = chosen[seq % world == rank]
    hard = torch.zeros_like(active)
    hard[(mine // seq_len) // world, mine % seq_len] = True
    return hard


DIGIT_BITS = 16  # one radix pass per 16 bits: a 65,536-bin int64 histogram (512 KB), whatever the token count
CHUNK_TOKENS = 1 << 18  # tokens select_hard_chunked reads at a time (about 8 MB of keys and indices)


def sortable_keys(confidence: Tensor) -> Tensor:
    """float32 values -> int64 keys in [0, 2**32) in the same order (-0.0 as 0.0): the IEEE bits with the sign bit
    set for a positive value, every bit flipped for a negative one."""
    bits = (confidence.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits | (1 << 31))


def select_hard_chunked(
    confidence: Tensor, active: Tensor, hard_ratio: float, chunk_tokens: int = CHUNK_TOKENS
) -> Iterator[Tensor]:
    """`select_hard`'s bottom `hard_ratio` of the active tokens, a chunk of sequences at a time (the mask's rows in
    order), in memory independent of the number of tokens: `confidence` and `active` may be memory-mapped files.
    Under torch.distributed they are this rank's shard (local sequence i is global sequence `i * world + rank`) and
    the ratio is over every rank's tokens.

    The tokens are ranked by (confidence, global token index) and the cut, the `n_hard`-th smallest pair, is found
    digit by digit (`_radix_select`): two passes over the confidences, then, only when some but not all of the
    tokens tied at the cut fit, a few over those tokens' indices (lowest index first)."""
    rank, world = distributed.world()
    sequences, seq_len = active.shape
    rows = max(1, chunk_tokens // seq_len)

    def chunks() -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:  # (rows, active flat positions, keys, indices)
        for start in range(0, sequences, rows):
            flat = active[start : start + rows].reshape(-1).nonzero().squeeze(1)
            keys = sortable_keys(confidence[start : start + rows].reshape(-1)[flat])
            index = ((start + flat // seq_len) * world + rank) * seq_len + flat % seq_len
            yield min(rows, sequences - start), flat, keys, index

    n_hard = int(int(distributed.global_sum(int(active.count_nonzero()))) * hard_ratio)
    cut_key, cut_index = -1, None  # hard: key < cut_key, or key == cut_key and index <= cut_index (None: any)
    if n_hard > 0:
        cut_key, below, tied = _radix_select(lambda: (keys for _, _, keys, _ in chunks()), n_hard, 32)
        if below + tied > n_hard:
            tokens = int(distributed.global_sum(sequences)) * seq_len
            tied_index = lambda: (index[keys == cut_key] for _, _, keys, index in chunks())  # noqa: E731
            cut_index = _radix_select(tied_index, n_hard - below, max(1, (tokens - 1).bit_length()))[0]
    for count, flat, keys, index in chunks():
        at_cut = keys == cut_key
        if cut_index is not None:
            at_cut &= index <= cut_index
        hard = torch.zeros(count * seq_len, dtype=torch.bool)
        hard[flat] = (keys < cut_key) | at_cut
        yield hard.view(count, seq_len)


def _radix_select(values: Callable[[], Iterator[Tensor]], k: int, bits: int) -> tuple[int, int, int]:
    """(v, below, equal): the k-th smallest (k >= 1) of the int64 values in [0, 2**bits) that each call of `values()`
    yields, over every rank, with how many are smaller than it and how many equal. One pass over the values per
    `DIGIT_BITS` bits, from the top digit: a histogram of the digit among the values that share the digits found."""
    prefix, below, equal = 0, 0, 0
    for shift in range(DIGIT_BITS * ((bits - 1) // DIGIT_BITS), -1, -DIGIT_BITS):
        histogram = torch.zeros(1 << DIGIT_BITS, dtype=torch.int64)
        for chunk in values():
            chunk = chunk[(chunk >> (shift + DIGIT_BITS)) == prefix]
            histogram += torch.bincount((chunk >> shift) & ((1 << DIGIT_BITS) - 1), minlength=1 << DIGIT_BITS)
        distributed.all_reduce_sum(histogram)
        cumulative = histogram.cumsum(0)
        digit = int(torch.searchsorted(cumulative, k - below))  # the first digit whose count reaches the k-th
        below += int(cumulative[digit] - histogram[digit])
        equal = int(histogram[digit])
        prefix = (prefix << DIGIT_BITS) | digit
    return prefix, below, equal


def calibrate_threshold(confidence: Tensor, hard_ratio: float) -> float:
    """A threshold at which about `1 - hard_ratio` of these (validation) confidences exit."""
    if confidence.numel() == 0:
        return 1.0
    ordered = confidence.sort().values
    k = min(int(math.ceil(len(ordered) * hard_ratio)), len(ordered) - 1)
    return float(ordered[k])
