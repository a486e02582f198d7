"""Hydra callback: the report of every multirun (in its sweep folder) and of every single run (in its run
folder), written when Hydra finishes. Registered in conf/config.yaml under `hydra.callbacks`.

A report is a convenience on top of finished runs: whatever goes wrong while writing it is one warning line
on stderr, never a failed sweep. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lego.report import write_report


def report_quietly(folder: Path) -> None:
    """Write the report of the runs in `folder`; a failure is one warning line."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        files = write_report([folder])
    except Exception as err:  # noqa: BLE001 - the runs are done; a broken report must not fail them
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"warning: no report for {folder}: {reason} (retry: python -m lego.report {folder})", file=sys.stderr)
        return
    print(f"report: {files.html} ({files.finished}/{files.runs} runs finished; summary.csv, summary_by_config.csv)")


class SweepReport(Callback):
    """The sweep's report when it ends; once a job has failed, also after every job from then on, since Hydra
    raises the failure when the sweep's jobs are done and never calls `on_multirun_end`."""

    def __init__(self) -> None:
        self.failed = False

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_quietly(Path(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if job_return is None or config.hydra.mode != RunMode.MULTIRUN:
            return
        self.failed = self.failed or job_return.status == JobStatus.FAILED
        if self.failed:
            report_quietly(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job = kwargs.get("job_return")
        if job is not None and job.hydra_cfg is not None:
            report_quietly(Path(job.hydra_cfg.hydra.runtime.output_dir))
