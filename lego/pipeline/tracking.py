"""Weights & Biases logging for one run, offline by default so it needs no account and no network.

Everything W&B writes lands under the run directory: `<run_dir>/wandb/offline-run-<time>-<id>/` holds the
transaction log (`run-<id>.wandb`), the media files (plots, the exit-stats table) and, in offline mode, the
staging copy of the table artifact, so the run folder alone is enough to upload it later with

    wandb sync <run_dir>/wandb/

One run directory is one W&B run: its id is kept in `<run_dir>/wandb/run_id`, and a resumed run continues it
(`resume="allow"`). Offline, wandb still starts a new `offline-run-*` folder per process, all with that id;
`wandb sync` (0.31, as installed) uploads the folders of one run one after another, oldest first, as that one
run. So that the merged history holds every step at most once, the run directory records what it logged: every
history row is noted in `<run_dir>/wandb/logged-<id>.jsonl` (its W&B step, its stage step, its keys) before it
goes to wandb, and a resumed Tracker logs only what that record does not hold (the steps between an interrupted
stage's last checkpoint and the kill, which the resumed stage trains again, were logged already) and numbers its
rows after the record's.

What a kill costs. wandb's service writes the rows it is given to the transaction log every 15 s or so (wandb
0.31) and when the run finishes. A process killed by a signal it does not handle (SIGKILL, the OOM killer,
SIGTERM) stops the service too, and the rows of its last seconds never reach the folder. Which ones, only wandb's
private log format tells, so the Tracker does not ask: it records each row before handing it to wandb, and a
resume logs nothing the record holds. So no step is ever logged twice and no two rows share a W&B step, but the
steps of those last seconds stay missing, also where the resumed stage trains them again. A run that ends any
other way (done, an error, Ctrl-C) loses nothing.

Users with an account use `wandb.mode=online`; `wandb.mode=disabled` turns logging off entirely (no wandb folder).
Only wandb's public API is used here; tests/wandb_offline.py reads the transaction logs back, for tests.

`import wandb` is deferred to `Tracker.__init__`: it takes about a second and a disabled run never needs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lego.atomic import atomic_write
from lego.errors import ConfigError, DataError

MODES = ("offline", "online", "disabled")
RUN_ID_FILE = "run_id"  # under <run_dir>/wandb/: the W&B run id of the run directory
LOGGED_FILE = "logged-{run_id}.jsonl"  # under <run_dir>/wandb/: one line per history row logged to that run

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
        self._logged: dict[str, int | None] = {}  # key -> the last stage step it was logged at (None: no stage)
        self._next_step = 0  # the W&B step of the next history row
        self._record: IO[str] | None = None  # wandb/logged-<id>.jsonl, appended to
        if mode == "disabled":
            return

        import wandb

        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb looks for the git root here before creating it
        run_id = _run_id(run_dir / "wandb")
        record = run_dir / "wandb" / LOGGED_FILE.format(run_id=run_id)
        self._logged, self._next_step = _read_record(record)
        settings = wandb.Settings(
            silent=True,  # no banner or sync hints; failures surface as our one-line errors
            console="off",  # leave stdout to tqdm and Hydra's own log file
            reinit="create_new",  # never hand back (or finish) a run some other code left open
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
        self._record = record.open("a", encoding="utf-8")

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

        Learn-then-Test's record and MoD's section give `ltt/<field>` and `mod/<field>` summary values (their scalars:
        the promised risk next to the measured one, the routing that scored the test PPL).
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
        for section in RESULT_SECTIONS:  # `ltt/test_risk`, `mod/test_ppl_topk`: a section's numbers, one level deep
            record = results.get(section) or {}
            summary.update({f"{section}/{key}": value for key, value in record.items() if _is_scalar(value)})
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
        """Log `row` as the run's next history row, minus what the run directory's record says was logged already:
        a key of a stage at or before this step (`axis` names the stage's step key, whose value in `row` is the
        step), or, for rows without an axis (the final media), a key logged at all.

        The row is recorded before wandb gets it, so a process killed in between leaves the row missing, never
        logged twice (see the module docstring)."""
        step = row[axis] if axis else None
        new = {key: value for key, value in row.items() if key != axis and not self._was_logged(key, step)}
        if not new:
            return
        entry = {"step": self._next_step, "at": step, "keys": sorted(new)}
        self._record.write(json.dumps(entry) + "\n")
        self._record.flush()  # in the OS's hands: a killed process keeps it
        self._logged.update(dict.fromkeys(new, step))
        if axis:
            new[axis] = step
        self._run.log(new, step=self._next_step, commit=True)  # commit: a row is written now, not with the next
        self._next_step += 1

    def _was_logged(self, key: str, step: int | None) -> bool:
        if key not in self._logged:
            return False
        last = self._logged[key]
        return step is None or (last is not None and step <= last)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent); exit code 1 marks it failed in W&B.

        Offline, `run.finish` may return before wandb's service has written the last of the transaction log; the
        log is complete once the process exits (wandb's exit hook waits for its service), before any `wandb sync`
        of it. The next job of a multirun logs to a run of its own meanwhile.
        """
        run, self._run = self._run, None
        if run is None:
            return
        self._record.close()
        run.finish(exit_code=exit_code)

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


RESULT_SECTIONS = ("ltt", "mod")  # results.json sections whose scalars become summary values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _run_id(wandb_dir: Path) -> str:
    """The W&B run id of a run directory: read from `wandb/run_id`, or made (8 characters in [a-z0-9], as wandb's
    own) and written there atomically."""
    path = wandb_dir / RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if not re.fullmatch(r"[\w.-]+", run_id):
            raise DataError(f"{path} holds {run_id!r}, not a W&B run id; delete the file to log to a new W&B run")
        if (wandb_dir / LOGGED_FILE.format(run_id=run_id)).is_file() or not any(wandb_dir.glob("offline-run-*")):
            return run_id
        # logged by a LEGO without the record: which rows it holds is unknown, so this resume gets its own run
        print(f"W&B: {wandb_dir} has no record of the rows run {run_id} holds; logging this resume as a new W&B run")
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write(path, lambda tmp: tmp.write_text(f"{run_id}\n"))
    return run_id


def _read_record(path: Path) -> tuple[dict[str, int | None], int]:
    """What the run directory's record says was logged: each key's last stage step (None: outside the stages),
    and the W&B step of the next history row. A line torn by a crash of the machine is skipped."""
    logged: dict[str, int | None] = {}
    next_step = 0
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        logged.update(dict.fromkeys(entry["keys"], entry["at"]))
        next_step = max(next_step, entry["step"] + 1)
    return logged, next_step
