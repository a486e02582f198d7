"""Hard-token selection and threshold calibration: which tokens the next block trains on, and the exit threshold
that lets about `1 - hard_ratio` of the tokens reaching a block leave there.

Under torch.distributed the hard tokens are the bottom `hard_ratio` of all ranks' active tokens, chosen by the same
`topk` over the gathered confidences in global token order, so with the same block they are exactly the tokens a
single process would choose; each rank keeps (and writes) its own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lego import distributed


def select_hard(confidence: Tensor, active: Tensor, hard_ratio: float) -> Tensor:
    """The bottom `hard_ratio` of the active tokens by confidence, as a new (sequences, seq) mask.

    By ratio, not by threshold: exactly `int(n_active * hard_ratio)` tokens, whatever the confidences.
    Under torch.distributed, `confidence` and `active` are this rank's shard and the ratio is global
    (`_select_hard_global`).
    """
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


def calibrate_threshold(confidence: Tensor, hard_ratio: float) -> float:
    """A threshold at which about `1 - hard_ratio` of these (validation) confidences exit."""
    if confidence.numel() == 0:
        return 1.0
    ordered = confidence.sort().values
    k = min(int(math.ceil(len(ordered) * hard_ratio)), len(ordered) - 1)
    return float(ordered[k])
