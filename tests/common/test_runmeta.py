"""Run metadata shared by the pipeline and the report: overrides, labels, and the one list of result-neutral keys
as its three readers use it (a resume, the report's configs, a run's label)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lego.common.runmeta import is_result_neutral, parse_overrides, run_label
from lego.errors import ConfigError
from lego.pipeline.config import register_configs
from lego.pipeline.files import write_json
from lego.pipeline.runner import _comparable, check_resumable
from lego.report.collect import Run
from tests.launch import REPO


def test_overrides_and_run_label():
    overrides = parse_overrides(["+experiment=small", "hard_ratio.value=0.3", "seed=1", "trainer.progress=false",
                                 "++model.dim=64"])  # fmt: skip
    assert overrides == {"experiment": "small", "hard_ratio.value": "0.3", "seed": "1", "trainer.progress": "false",
                         "model.dim": "64"}  # fmt: skip
    assert run_label("small", overrides) == "small hard_ratio.value=0.3 seed=1 model.dim=64"


def test_a_key_is_result_neutral_when_it_is_listed_or_lies_under_one_listed():
    assert is_result_neutral("wandb") and is_result_neutral("wandb.mode") and is_result_neutral("objective.metric")
    assert not any(map(is_result_neutral, ["wandbx", "seed", "trainer.dump", "trainer.dump_dtype", "model.dim"]))


def test_labels_leave_out_result_neutral_keys_but_show_the_seed_and_trainer_dump():
    overrides = {"wandb.mode": "disabled", "objective.metric": "val_ppl_at_cost", "trainer.dump": "none", "seed": "2"}
    assert run_label("tiny", overrides) == "tiny trainer.dump=none seed=2"


@pytest.fixture(scope="module")
def resolved() -> dict:
    """`+experiment=tiny` composed and resolved, as the runner saves it in run_config.json."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=["+experiment=tiny"]), resolve=True)


def _changed(resolved: dict, dotted: str, value) -> dict:
    changed = OmegaConf.create(resolved)
    OmegaConf.update(changed, dotted, value)
    return OmegaConf.to_container(changed)


@pytest.mark.parametrize("key,value", [("wandb.mode", "disabled"), ("trainer.progress", False),
                                       ("objective.metric", "val_ppl_at_cost"), ("cache_dir", "/elsewhere"),
                                       ("trainer.num_threads", 1), ("trainer.dump", "none")])  # fmt: skip
def test_a_resume_may_change_result_neutral_keys_and_trainer_dump(tmp_path, resolved, key, value):
    write_json(tmp_path / "run_config.json", _comparable(resolved))
    check_resumable(tmp_path, _changed(resolved, key, value))


@pytest.mark.parametrize("key,value", [("seed", 1), ("trainer.dump_dtype", "float32"), ("model.dim", 96)])
def test_a_resume_refuses_another_seed_or_result_changing_key(tmp_path, resolved, key, value):
    write_json(tmp_path / "run_config.json", _comparable(resolved))
    with pytest.raises(ConfigError, match=rf"another config \({key}: "):
        check_resumable(tmp_path, _changed(resolved, key, value))


def test_the_report_groups_over_seeds_and_result_neutral_keys_not_over_trainer_dump():
    def config(**more):
        return Run(Path("."), "run", {"hard_ratio.value": "0.3", **more}, 0, "finished").config_key()

    assert config(**{"seed": "1", "objective.metric": "val_ppl_at_cost", "wandb": "disabled"}) == config()
    assert config(**{"trainer.dump": "none"}) != config()
