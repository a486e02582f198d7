"""Held-out evaluation through TRUE early exit (`evaluate_routed`, from `lego.training.routing`: PPL, accuracy,
per-block exit statistics), a threshold scan that turns one trained model into a PPL-vs-compute curve, the
exit thresholds by Learn-then-Test (`ltt_calibrate`, `trainer.calibration=ltt`), and the measured speed-up."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Collection, Iterator

import torch
from torch import Tensor

from lego.model import LEGOTransformer, cross_entropy_rows
from lego.training.ltt import fixed_sequence_test
from lego.training.precision import DEFAULT_PRECISION, autocast
from lego.training.routing import evaluate_routed, evaluate_settings
from lego.training.selection import calibrate_threshold


def set_exit_share(
    model: LEGOTransformer,
    val_windows: Tensor,
    share: float,
    batch_size: int,
    device,
    cache: dict | None = None,
    precision: str = DEFAULT_PRECISION,
    exits: Collection[int] | None = None,
) -> None:
    """Set every early-exit threshold so that about `share` of the validation tokens reaching each block
    exit there (`exit_share_thresholds`); with `exits`, only those blocks' (the others never exit)."""
    thresholds = exit_share_thresholds(model, val_windows, [share], batch_size, device, cache, precision, exits)
    for block, threshold in zip(model.blocks, thresholds[share], strict=True):
        block.threshold = threshold


def exit_share_thresholds(
    model: LEGOTransformer,
    val_windows: Tensor,
    shares: list[float],
    batch_size: int,
    device,
    cache: dict | None = None,
    precision: str = DEFAULT_PRECISION,
    exits: Collection[int] | None = None,
    on_pass: Callable[[], None] | None = None,
) -> dict[float, list[float]]:
    """For each exit share, every block's threshold so that about that share of the validation tokens reaching
    the block exit there (block by block, since who reaches block k depends on the thresholds before it; the last
    block and, with `exits`, the blocks not in it never exit: infinite). A share <= 0 is full depth.

    Block k's confidences are needed once per setting of the thresholds before it: all shares' settings are
    evaluated in one pass (`evaluate_settings`: Block 0 once per batch), and `cache` keeps them across calls.
    `on_pass` is called after each pass (progress)."""
    cache = {} if cache is None else cache
    n = len(model.blocks)
    chosen = {share: [math.inf] * n for share in shares}
    for k in range(n - 1):
        if exits is not None and k not in exits:
            continue
        keys = {share: (k, *chosen[share][:k]) for share in shares if share > 0.0}
        missing = list(dict.fromkeys(key for key in keys.values() if key not in cache))
        if missing:
            # everything reaching block k exits there (-inf): its confidences are what they would be, later blocks idle
            settings = [[*key[1:], -math.inf, *[math.inf] * (n - k - 1)] for key in missing]
            results = evaluate_settings(model, val_windows, settings, batch_size, device, precision, keep_confidences=k)
            cache.update({key: result["confidences"] for key, result in zip(missing, results, strict=True)})
            if on_pass:
                on_pass()
        for share, key in keys.items():
            chosen[share][k] = calibrate_threshold(cache[key], hard_ratio=1.0 - share)
    return chosen


def threshold_scan(
    model: LEGOTransformer,
    val_windows: Tensor,
    test_windows: Tensor,
    shares: list[float],
    batch_size: int,
    device,
    score_val: bool = False,
    precision: str = DEFAULT_PRECISION,
    also: list[list[float]] = (),
    on_pass: Callable[[], None] | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Test PPL and cost at a range of exit shares (0 = no early exit: the full-depth model); with `score_val`
    also the validation PPL and cost at each (what a sweeper may tune on). Forwards in `precision`; the model's
    thresholds are left as they were.

    Each split is read once for the whole scan (`evaluate_settings`), together with the threshold settings of
    `also` (e.g. the model's own, calibrated ones). Returns the scan's rows sorted by honest cost, then the
    test and the validation `evaluate_routed` results of each setting of `also`. `on_pass` is called after each
    pass over a split, `scan_passes` of them (progress)."""
    shares = sorted({0.0, *shares})
    thresholds = exit_share_thresholds(model, val_windows, shares, batch_size, device, precision=precision,
                                       on_pass=on_pass)  # fmt: skip
    settings = [thresholds[share] for share in shares]
    test = evaluate_settings(model, test_windows, [*also, *settings], batch_size, device, precision)
    if on_pass:
        on_pass()
    val = evaluate_settings(model, val_windows, [*also, *(settings if score_val else [])], batch_size, device,
                            precision)  # fmt: skip
    if on_pass:
        on_pass()
    rows = []
    for i, share in enumerate(shares):
        result = test[len(also) + i]
        rows.append({
            "target_exit_share": share,
            "test_ppl": result["ppl"],
            "test_acc": result["acc"],
            "shallow_ratio": result["shallow_ratio"],
            "compute_cost": result["compute_cost"],
            "honest_cost": result["honest_cost"],
            "seconds": result["seconds"],
        })  # fmt: skip
        if score_val:
            rows[-1].update(val_ppl=val[len(also) + i]["ppl"], val_honest_cost=val[len(also) + i]["honest_cost"])
    return sorted(rows, key=lambda row: row["honest_cost"]), test[: len(also)], val[: len(also)]


def scan_passes(model: LEGOTransformer, shares: list[float]) -> int:
    """How many passes over a split `threshold_scan` makes: one per early-exit block to calibrate the shares'
    thresholds on validation (none when no share exits), then test, then validation."""
    return (len(model.blocks) - 1 if any(share > 0.0 for share in shares) else 0) + 2


__all__ = [  # evaluate_routed is this module's too: README's load_run snippet imports it from here
    "evaluate_routed", "exit_share_thresholds", "ltt_calibrate", "measure_speedup", "scan_passes", "set_exit_share",
    "threshold_scan", "timing_passes", "token_predictions",
]  # fmt: skip

CALIBRATIONS = ("ratio", "ltt")  # trainer.calibration: the method's own thresholds, or Learn-then-Test's
LTT_RISKS = ("disagreement", "ppl")  # trainer.ltt_risk
LTT_SHARES = tuple(i / 50 for i in range(50))  # the exit shares Learn-then-Test tests, 0 (no exit) first
PPL_LOSS_BOUND = 1.0  # nats: the `ppl` risk's loss, a window's mean CE increase, clipped to [0, this], over this


@torch.no_grad()
def token_predictions(
    model: LEGOTransformer, windows: Tensor, batch_size: int, device, precision: str = DEFAULT_PRECISION
) -> tuple[Tensor, Tensor]:
    """Every token's argmax and cross-entropy, (n, seq) each, with the blocks' current thresholds."""
    model.eval()
    argmax, ce = [], []
    for batch in windows.split(batch_size):
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with autocast(device, precision):
            logits = model(x)
        ce.append(cross_entropy_rows(logits.flatten(0, 1), y.flatten()).view_as(y).cpu())
        argmax.append(logits.argmax(dim=-1).cpu())
    return torch.cat(argmax), torch.cat(ce)


def window_losses(routed: tuple[Tensor, Tensor], full: tuple[Tensor, Tensor], risk: str) -> Tensor:
    """Each window's loss in [0, 1] against the same model at full depth (`token_predictions` of both): its share of
    tokens whose prediction changed (`disagreement`), or its mean CE increase clipped to [0, PPL_LOSS_BOUND] nats, over
    the bound (`ppl`). A window is Learn-then-Test's unit: its tokens are not independent draws, windows nearly are."""
    if risk == "disagreement":
        return (routed[0] != full[0]).double().mean(dim=1)
    return (routed[1] - full[1]).double().mean(dim=1).clamp(0.0, PPL_LOSS_BOUND) / PPL_LOSS_BOUND


def ltt_level(risk: str, epsilon: float) -> float:
    """`epsilon` in `window_losses`' units: the share of changed predictions itself; for `ppl` a PPL at most
    1 + epsilon times full depth's, a mean CE increase of log(1 + epsilon) nats, over the bound."""
    return epsilon if risk == "disagreement" else math.log1p(epsilon) / PPL_LOSS_BOUND


def measured_risk(routed: tuple[Tensor, Tensor], full: tuple[Tensor, Tensor], risk: str) -> float:
    """The promised quantity, measured: the share of changed predictions, or the relative PPL increase."""
    if risk == "disagreement":
        return float((routed[0] != full[0]).double().mean())
    return math.exp(float(routed[1].double().mean() - full[1].double().mean())) - 1.0


def ltt_calibrate(
    model: LEGOTransformer,
    val_windows: Tensor,
    test_windows: Tensor,
    risk: str,
    epsilon: float,
    delta: float,
    batch_size: int,
    device,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """Set the exit thresholds by Learn-then-Test (`lego.training.ltt`): the largest exit share of `LTT_SHARES` whose
    risk against full depth is certified <= `epsilon` with probability >= 1 - `delta`; returns its record, with the
    risk then measured on `test_windows` (the thresholds are chosen before the test split is read).

    The blocks calibrated are those the method lets exit (a finite threshold, never the last), with one shared
    exit share, each block letting that share of the tokens reaching it exit (`set_exit_share`). The grid is fixed
    on the first half of the validation windows (the share's thresholds) and tested on the second (its risk), so the
    thresholds tested do not depend on the windows that test them. Share 0 is full depth: risk 0, no pass."""
    exits = [k for k, block in enumerate(model.blocks[:-1]) if block.threshold < math.inf]
    half = len(val_windows) // 2
    grid, calibration = val_windows[:half], val_windows[half:]
    level, cache = ltt_level(risk, epsilon), {}

    def at(share: float, windows: Tensor) -> tuple[Tensor, Tensor]:
        set_exit_share(model, grid, share, batch_size, device, cache, precision, exits)
        return token_predictions(model, windows, batch_size, device, precision)

    def losses() -> Iterator[Tensor]:
        if not (exits and half):
            return
        full = at(0.0, calibration)
        for share in LTT_SHARES:
            yield window_losses(at(share, calibration) if share else full, full, risk)

    result = fixed_sequence_test(losses(), level, delta)
    share = LTT_SHARES[result.chosen] if result.certified else 0.0
    test_loss = test_risk = 0.0
    if share:
        test_full = at(0.0, test_windows)
        test_routed = at(share, test_windows)  # and the chosen thresholds stay set
        test_loss = float(window_losses(test_routed, test_full, risk).mean())
        test_risk = measured_risk(test_routed, test_full, risk)
    else:
        set_exit_share(model, grid, 0.0, batch_size, device)  # no exit
    chosen = result.tested[result.chosen] if result.certified else {}
    return {
        "risk": risk, "epsilon": epsilon, "delta": delta, "level": level, "exit_blocks": exits,
        "exit_share": share, "thresholds": [block.threshold for block in model.blocks[:-1]],
        "grid_windows": len(grid), "calibration_windows": len(calibration), "certified": result.certified,
        "val_loss": chosen.get("risk"), "p_value": chosen.get("p_value"),
        "tested": [{"exit_share": s, **row} for s, row in zip(LTT_SHARES, result.tested, strict=False)],
        "test_loss": test_loss, "test_risk": test_risk,
    }  # fmt: skip


SPEEDUP_ROUNDS = 9
# A measured speed-up counts (`speedup_caveat`) when the 1-minute load average stays at most this per CPU (this
# process's own threads load each CPU about 1)...
BUSY_LOAD_PER_CPU = 1.5
QUIET_NOISE = 0.05  # ...and its timing noise is at most 5 % or half its effect |speed-up - 1|


def timing_passes(repeats: int = SPEEDUP_ROUNDS) -> int:
    """How many forwards over its batches `measure_speedup` makes, one `on_pass` call each: a warm-up of either
    side, then two per round."""
    return 2 + 2 * repeats


@torch.no_grad()
def measure_speedup(
    model: LEGOTransformer,
    windows: Tensor,
    batch_size: int,
    device,
    repeats: int = SPEEDUP_ROUNDS,
    max_batches: int = 8,
    on_pass: Callable[[], None] | None = None,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """Wall time of the forward at full depth over the forward with the current thresholds, on the same
    batches, in `repeats` alternating rounds (the order flips every round, so neither side always runs
    first). Returns the median ratio with its quartiles and every round's ratio: one timing on a shared
    machine cannot tell 1.1x from noise, the spread can. Both sides run in `precision`.

    The noise floor comes from the same passes, at no extra cost: as the order flips, two passes of equal work
    meet at every round boundary (full routed | routed full | full routed ...), and their ratio (earlier over
    later, 1 on an ideal machine) is a null timing of what the machine alone does to two adjacent passes.
    `noise` is the upper quartile of |null - 1| over those `repeats - 1` pairs, robust to one hiccup as the
    median is. The trade-off against timing separate null rounds: the pairs share their passes with the rounds,
    and a cost of the first pass after the thresholds change counts as noise (conservative) where the rounds
    cancel it. `load` is the 1-minute load average at the start and the end over the CPU count (None where the
    OS has none); `caveat` says why the figure means nothing, None when it counts (`speedup_caveat`).
    `on_pass` is called after each pass, so a progress bar moves through a timing that takes minutes on a busy
    machine."""
    model.eval()
    batches = [b[:, :-1].to(device) for b in windows[: max_batches * batch_size].split(batch_size)]
    thresholds = [block.threshold for block in model.blocks]
    on_gpu = torch.device(device).type == "cuda"
    load_start = _load_average()

    def timed(routed: bool) -> float:
        for block, threshold in zip(model.blocks, thresholds, strict=True):
            block.threshold = threshold if routed else float("inf")
        start = time.perf_counter()
        with autocast(device, precision):
            for batch in batches:
                model(batch)
        if on_gpu:  # the kernels still queued belong to this pass
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if on_pass:
            on_pass()
        return seconds

    rounds = []  # (full, routed) seconds
    try:
        timed(True), timed(False)  # warm-up
        for round_ in range(repeats):
            if round_ % 2:
                routed, full = timed(True), timed(False)
            else:
                full, routed = timed(False), timed(True)
            rounds.append((full, routed))
    finally:
        for block, threshold in zip(model.blocks, thresholds, strict=True):
            block.threshold = threshold
    load_end = _load_average()
    ratios = [full / routed for full, routed in rounds]
    # round r starts with what round r - 1 ended with: routed (index 1) when r is odd, full (index 0) when even
    null = [rounds[r - 1][r % 2] / rounds[r][r % 2] for r in range(1, repeats)]
    q25, median, q75 = _quartiles(ratios)
    timing = {
        "median": median,
        "q25": q25,
        "q75": q75,
        "rounds": ratios,
        "null_rounds": null,
        "noise": _quartiles([abs(ratio - 1) for ratio in null])[2] if null else None,
        "load": None if load_start is None else {"start": load_start, "end": load_end, "cpus": os.cpu_count()},
    }
    return {**timing, "caveat": speedup_caveat(timing)}


def speedup_caveat(timing: dict) -> str | None:
    """Why a measured speed-up means nothing ("machine busy", "noisy timings"), or None when it counts: no other
    work competed for the CPUs (a 1-minute load average of at most BUSY_LOAD_PER_CPU per CPU at the start and the
    end of the timing) and the timing noise, the larger of the null pairs' `noise` and the rounds' quartile
    half-width over their median, is at most QUIET_NOISE or half the effect |speed-up - 1|, whichever is larger
    (a 1.3x within ±10 % is still a speed-up; a 0.96x within ±8 % is no slow-down)."""
    load = timing["load"]
    if load and max(load["start"], load["end"]) > BUSY_LOAD_PER_CPU * (load["cpus"] or 1):
        return "machine busy"
    median = timing["median"]
    spread = (timing["q75"] - timing["q25"]) / 2 / median
    if max(timing["noise"] or 0.0, spread) > max(QUIET_NOISE, abs(median - 1) / 2):
        return "noisy timings"
    return None


def _quartiles(values: list[float]) -> list[float]:
    """[lower quartile, median, upper quartile]; a single value is all three."""
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3


def _load_average() -> float | None:
    """The 1-minute load average: runnable processes, this one's threads included (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return None
