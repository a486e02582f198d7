"""A config group given something that is none of its options (`hard_ratio=0.3`): one line naming the options and,
where the value fits a key of the group, the override meant; exit 2 before Hydra composes anything."""

from pathlib import Path

import pytest

from lego.pipeline.config import exit_on_unknown_override_keys
from tests.launch import run_train

CONF = Path(__file__).parents[2] / "conf"


@pytest.mark.parametrize(
    "override, message",
    [
        ("hard_ratio=0.3", "hard_ratio=0.3: hard_ratio is a config group (options: constant, per_block); "
                           "to set its value use hard_ratio.value=0.3"),
        ("model=huge", "model=huge: config group model has no option huge (options: small, tiny)"),
        ("+experiment=smal", "+experiment=smal: config group experiment has no option smal (did you mean small? "
                             "options: compare_asymmetric, "),
    ],
)  # fmt: skip
def test_a_wrong_group_value_is_one_line_and_exit_2(tmp_path, cache_dir, override, message):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", override, cache_dir=cache_dir, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {message}") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["hard_ratio=[0.5,0.3]"], "to set its per_block use hard_ratio.per_block=[0.5,0.3]"),
        (["tokenizer=4096"], "tokenizer is a config group (options: bpe, bytes, file); to set one of its keys use "
                             "tokenizer.vocab_size=4096 or tokenizer.max_train_chars=4096"),
        (["model=256"], "to set one of its keys use model.dim=256 or model.num_heads=256 or model.hidden_dim=256"),
        (["wandb=false"], "wandb is a config group (options: disabled, offline, online); pick one of its options"),
        (["moe=null"], "moe is a config group (options: e8_top2_aux, e8_top2_bias); to select none of them use ~moe"),
        (["moe=e8_top2_aux,e8_top2_baes"], "config group moe has no option e8_top2_baes (did you mean e8_top2_bias?"),
        (["-m", "hard_ratio=interval(0.2,0.8)"], "to set its value use hard_ratio.value=interval(0.2,0.8)"),
    ],
)  # fmt: skip
def test_the_message_names_the_key_the_value_fits(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        exit_on_unknown_override_keys(args, CONF)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["model=tiny"], ["+experiment=tiny", "moe=e8_top2_aux"], ["-m", "model=tiny,small"], ["-m", "model=glob(*)"],
     ["hard_ratio=per_block", "hard_ratio.value=0.3"]],
)  # fmt: skip
def test_options_of_a_group_pass(capsys, args):
    exit_on_unknown_override_keys(args, CONF)  # SystemExit would fail the test
    assert capsys.readouterr().err == ""


def test_a_group_of_an_added_config_dir_offers_its_options(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "wide.yaml").write_text("dim: 512\n")
    exit_on_unknown_override_keys(["-cd", str(tmp_path), "model=wide"], CONF)
    with pytest.raises(SystemExit):
        exit_on_unknown_override_keys(["-cd", str(tmp_path), "model=huge"], CONF)
    assert "(options: small, tiny, wide)" in capsys.readouterr().err
