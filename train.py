"""LEGO experiment runner: `python train.py +experiment=small` (see README.md for sweeps and resuming)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lego.pipeline.config import exit_on_unknown_override_keys, register_configs
from lego.pipeline.job_log import hydra_job_log, mirror_output
from lego.pipeline.runner import main as run_main

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with mirror_output(hydra_job_log()):  # train.log holds what the run prints
        return run_main(cfg)


if __name__ == "__main__":
    exit_on_unknown_override_keys(sys.argv[1:], Path(__file__).parent / "conf")
    main()
