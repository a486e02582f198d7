"""Sweep job folders: `<job number>_<overrides>`, one level, short and filesystem-safe whatever the overrides hold."""

import re

from hydra import compose, initialize_config_dir

from lego.pipeline.config import JOB_DIRNAME_CHARS, job_dirname, register_configs
from tests.launch import REPO, run_train


def test_job_dirnames_are_one_safe_level():
    assert job_dirname(0, "hard_ratio.value=0.3") == "0_hard_ratio.value=0.3"
    assert job_dirname(3, "data.files=[/data/a.txt,../b c.txt]") == "3_data.files=_data_a.txt,.._b_c.txt"
    assert job_dirname(1, "") == "1"
    long_a, long_b = (f"data.files=[/{'x' * 300}/{name}.txt]" for name in ("a", "b"))
    name_a, name_b = job_dirname(12, long_a), job_dirname(12, long_b)
    assert name_a.startswith("12_data.files=_xxx") and name_a.endswith("xxx_a.txt") and name_b.endswith("xxx_b.txt")
    one, two = (f"data.files=[/{'x' * 100}/{middle}/{'y' * 100}/a.txt]" for middle in ("one", "two"))
    assert job_dirname(0, one) != job_dirname(0, two)  # cut to the same start and end, told apart by the hash
    for name in (name_a, name_b, job_dirname(0, "a:b*?<>|\\\"'é\n=1")):
        assert re.fullmatch(r"[0-9]+(_[A-Za-z0-9._=,+-]+)?", name) and len(name) <= JOB_DIRNAME_CHARS + 4, name


def test_a_sweep_over_a_file_path_keeps_the_job_in_one_folder(tmp_path, cache_dir):
    corpus = tmp_path / "corpus" / "texts"
    corpus.mkdir(parents=True)
    sentences = [f"Sentence {i}: the quick brown fox jumps over the lazy dog." for i in range(400)]
    (corpus / "a.txt").write_text(" ".join(sentences))
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", "+experiment=tiny", "data=text_files", f"data.files=[{corpus}/a.txt]", "data.max_train_tokens=4000",
        "data.max_eval_tokens=1000", "data.span_chars=2000", "trainer.threshold_scan=[0.0]", "wandb=disabled",
        f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [path for path in sweep.iterdir() if (path / ".hydra").is_dir()]
    assert len(jobs) == 1 and (jobs[0] / "results.json").is_file()  # the job's folder is the sweep folder's child
    assert jobs[0].name.startswith("0_data.files=_tmp") and len(jobs[0].name) <= JOB_DIRNAME_CHARS + 2


def test_job_folder_names_leave_out_the_experiment_and_the_result_neutral_keys():
    """Hydra's `override_dirname` (the folder name's overrides) as `run_label` shows them: the seed and
    `trainer.dump` stay, the experiment (the sweep folder's name) and the result-neutral keys go."""
    register_configs()
    overrides = ["+experiment=tiny", "hard_ratio.value=0.3", "seed=1", "wandb=disabled", "wandb.mode=offline",
                 "trainer.device=cpu", "trainer.progress=false", "objective.metric=val_ppl_at_cost",
                 "trainer.dump=none"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "hard_ratio.value=0.3,seed=1,trainer.dump=none"
