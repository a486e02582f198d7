"""The GPU check runs on a bare machine (torch, numpy, safetensors; no hydra, wandb, datasets, pytest): read from
the source, its scripts import nothing else, and `scripts/gpu_check.sh --smoke` runs end to end on the CPU with
every other package made unimportable. Not timed: the numbers are not checked."""

import json
import subprocess
import sys
from pathlib import Path

from tests.launch import REPO
from tests.test_layering import MODEL_CODE, _imports, _third_party

SCRIPTS = ("experiments.bench_gpu", "experiments.gpu_check")
ABSENT = ("hydra", "omegaconf", "wandb", "datasets", "tokenizers", "matplotlib", "tqdm", "pytest")  # on the GPU machine


def _path(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def _closure(modules: tuple[str, ...]) -> set[str]:
    """Every local module these import, directly or not, with the packages whose __init__ an import runs."""
    seen, stack = set(), list(modules)
    while stack:
        module = stack.pop()
        parts = module.split(".")
        for name in (".".join(parts[: i + 1]) for i in range(len(parts))):
            if name not in seen and _path(name):
                seen.add(name)
                stack += [found for found in _imports(_path(name)) if found.split(".")[0] in ("lego", "experiments")]
    return seen


def test_the_gpu_check_imports_only_model_code_torch_numpy_and_safetensors():
    for script in SCRIPTS:
        direct = {name for name in _imports(_path(script)) if name.split(".")[0] == "lego"}
        assert direct <= MODEL_CODE, script
    closure = _closure(SCRIPTS)
    assert {"lego.model", "lego.moe", "lego.layers", "experiments.bench_common"} <= closure
    third_party = set().union(*(_third_party(_imports(_path(module))) for module in closure)) - {"experiments"}
    assert third_party <= {"torch", "numpy", "safetensors"}, third_party


def test_gpu_check_smoke_runs_on_a_bare_machine(tmp_path):
    absent = tmp_path / "absent"
    for name in ABSENT:
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(absent), "HOME": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import hydra"], env=env, capture_output=True, text=True)
    assert "not on the GPU machine" in blocked.stderr  # the stand-ins do shadow the installed packages
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 of 2 checks passed" in done.stdout and "targets met:" in done.stdout
    checks = json.loads((out / "checks.json").read_text())
    assert [row["passed"] for row in checks["checks"]] == [True, True]

    results = json.loads((out / "bench_gpu.json").read_text())
    assert not results["errors"], results["errors"]
    assert [row["mode"] for row in results["dense"]] == ["eager", "compiled"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in results["dense"])  # no peak on the CPU
    assert sorted(row["active"] for row in results["sparse"]) == [0.25, 0.25, 0.5, 0.5]
    assert all(0 < row["ideal"] < 1 for row in results["sparse"])
    assert all(0 < row["honest_cost"] < 1 for row in results["early_exit"])
    assert results["moe"]["grouped_mm_runs"] and results["moe"]["grouped_over_dense"] > 0
    targets = {(row["target"], row["point"]): row["met"] for row in results["targets"]}
    assert len(targets) == 6 and targets[("dense compiled MFU", "compiled")] is None
    table = (out / "bench_gpu.md").read_text()
    assert "not a measurement" in table and "| target | point | value | bound | met |" in table
