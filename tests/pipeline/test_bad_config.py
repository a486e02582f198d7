"""Bad config values: one clear line on stderr, a non-zero exit, and no run directory left behind."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lego.errors import ConfigError
from lego.pipeline.config import exit_on_unknown_override_keys, register_configs, to_run_config
from tests.launch import run_train

CONF = Path(__file__).parents[2] / "conf"
register_configs()

BAD = [
    ("hard_ratio.value=1.5", "hard_ratio.value=1.5"),
    ("model.num_heads=3", "model.num_heads=3"),
    ("block_schedule.blocks.0.layers=0", "block_schedule.blocks[0].layers=0"),
    ("hard_ratio.per_block=[0.5,0.5,0.5]", "hard_ratio.per_block has 3 values"),
    ("wandb.mode=sometimes", "wandb.mode='sometimes'"),
    ("data.seq_len=0", "data.seq_len=0"),
    ("trainer.memory_budget_mb=-1", "trainer.memory_budget_mb=-1.0 must be a finite number >= 0"),
    # these two used to crash with a traceback and leave a run directory
    ("block_schedule.blocks.0.lr=nan", "block_schedule.blocks[0].lr=nan must be a finite number > 0"),
    ("trainer.num_threads=-4", "trainer.num_threads=-4 must be positive"),
]

# Values that used to be accepted (and trained to NaN, or meant nothing): each is one ConfigError naming its key.
OUT_OF_RANGE = {
    "block_schedule.blocks.0.lr=inf": "block_schedule.blocks[0].lr=inf must be a finite number > 0",
    "trainer.grad_clip=nan": "trainer.grad_clip=nan must be a finite number > 0",
    "block_schedule.blocks.1.weight_decay=-0.1": "block_schedule.blocks[1].weight_decay=-0.1 must be a finite number",
    "block_schedule.blocks.0.min_lr_ratio=-1": "block_schedule.blocks[0].min_lr_ratio=-1.0 must be a finite number",
    "block_schedule.blocks.0.min_lr_ratio=2": "<= 1",
    "trainer.threshold_scan=[]": "trainer.threshold_scan is empty",
    "trainer.threshold_scan=[0.5,nan]": "trainer.threshold_scan=nan",
    "model.rope_base=0": "model.rope_base=0.0 must be a finite number > 1",
    "objective.max_honest_cost=nan": "objective.max_honest_cost=nan",
    "trainer.divergence_factor=0.5": "trainer.divergence_factor=0.5 must be a finite number > 1",
    "block_schedule.blocks.0.max_steps=0": "block_schedule.blocks[0].max_steps=0 must be positive",
    "trainer.log_every_steps=0": "trainer.log_every_steps=0 must be positive",
    "trainer.checkpoint_every_steps=-5": "trainer.checkpoint_every_steps=-5 must be positive",
    "block_schedule.blocks.0.exit_loss_weight=-1": "block_schedule.blocks[0].exit_loss_weight=-1.0",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_every_numeric_value_has_its_range_checked(override):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=tiny", override])
    with pytest.raises(ConfigError) as caught:
        to_run_config(cfg)
    assert OUT_OF_RANGE[override] in str(caught.value)


@pytest.mark.parametrize("override,message", BAD)
def test_out_of_range_values_fail_before_any_work(tmp_path, cache_dir, override, message):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", override, cache_dir=cache_dir, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


UNKNOWN = {
    "+model.foo=1": "unknown config key model.foo (no such key;",
    "+model.dimm=3": "unknown config key model.dimm (did you mean model.dim?)",
    "+block_schedule.blocks.0.lrr=0.1": "block_schedule.blocks[0].lrr (did you mean block_schedule.blocks[0].lr?)",
    "+model.seq_len=64": "unknown config key model.seq_len (did you mean data.seq_len?)",
    "+seeed=3": "unknown config key seeed (did you mean seed?)",
}


@pytest.mark.parametrize(
    "overrides,messages",
    [
        (list(UNKNOWN), list(UNKNOWN.values())),
        (["+universal.preset=lpt"], ["universal.preset is read only by method=universal"]),
        # without `+`, Hydra itself would refuse them, in several lines suggesting `+model.dimm=3`
        (["model.dimm=3", "block_schedule.blocks.1.lrr=0.1"],
         ["unknown config key model.dimm (did you mean model.dim?)",
          "block_schedule.blocks[1].lrr (did you mean block_schedule.blocks[1].lr?)"]),
    ],
)
def test_unknown_keys_fail_before_any_work(tmp_path, cache_dir, overrides, messages):
    """`+key=value` adds a key that Hydra's typed nodes lack; it must not be dropped silently."""
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", *overrides, cache_dir=cache_dir, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert all(message in lines[0] for message in messages), lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_key_of_every_preset_passes_the_override_check(preset):
    """The command-line check knows every key a composed config has: none of them is refused as a typo."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}"])
    overrides = [f"{key}=1" for key in _leaf_keys(OmegaConf.to_container(cfg, resolve=False))]
    assert len(overrides) > 40
    exit_on_unknown_override_keys(overrides, CONF)  # SystemExit would fail the test


def test_hydra_groups_and_flag_values_pass_the_override_check(tmp_path):
    """Hydra's own config groups (`hydra/sweeper=optuna`), groups of an added config dir and the values of
    Hydra's flags are not our keys."""
    (tmp_path / "mygroup").mkdir()
    exit_on_unknown_override_keys(
        ["hydra/sweeper=optuna", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", "hydra/launcher=basic",
         "hydra.job.chdir=false", "--config-name", "a=b", "-cd", str(tmp_path), "mygroup=x", "seed=1"],
        CONF,
    )  # fmt: skip
    exit_on_unknown_override_keys(["-sc", "install=bash"], CONF)  # a shell-completion command
    with pytest.raises(SystemExit) as exit_info:
        exit_on_unknown_override_keys(["-m", "hydra/sweeper=basic", "seeed=1"], CONF)
    assert exit_info.value.code == 2


def _leaf_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):  # an empty one (`universal: {}`) has no key to set
        return [key for name, value in node.items() for key in _leaf_keys(value, f"{prefix}{name}.")]
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return [key for i, value in enumerate(node) for key in _leaf_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")]


def test_wrong_type_is_rejected_by_the_schema(tmp_path, cache_dir):
    proc = run_train("+experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}", "model.dim=wide", cache_dir=cache_dir)
    assert proc.returncode != 0
    assert "model.dim" in proc.stderr and "wide" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_is_one_line_and_leaves_no_run(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "data=text_files",
        f"data.files=[{tmp_path}/missing.txt]",
        cache_dir=cache_dir,
        timeout=60,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.files" in last and "missing.txt" in last
    assert not run_dir.exists()


def test_the_loops_own_range_check_is_the_one_the_config_runs():
    """One range check per setting (issue 19): a notebook's FitConfig gets the message the runner's config gets,
    without the config key's prefix."""
    from lego import FitConfig
    from lego.errors import ConfigError

    for kwargs, message in (({"epochs": 0}, "epochs=0 must be positive"), ({"lr": 0.0}, "lr=0.0 must be a finite"),
                            ({"hard_ratio": 1.5}, "hard_ratio=1.5 must be a number in (0, 1)"),
                            ({"exit_loss_weight": -1.0}, "exit_loss_weight=-1.0 must be a finite number >= 0"),
                            ({"checkpoint_every_steps": 0}, "checkpoint_every_steps=0 must be positive")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            FitConfig(**kwargs)
        assert str(err.value).startswith(message), err.value
