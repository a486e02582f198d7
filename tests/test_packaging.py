"""Packaging: building the project's metadata (what `pip install -e .` does first) is warning-free; README's Python
example runs."""

import subprocess
import sys

from tests.launch import REPO


def test_metadata_builds_without_deprecation_warnings(tmp_path):
    hook = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", hook, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DeprecationWarning" not in proc.stderr, proc.stderr[-2000:]
    metadata = (tmp_path / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_readme_python_example_runs():
    """README's "Using the model from Python" block runs as printed (MoE and routing tally included)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using the model from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imbalance" in proc.stdout and "block1.layer1" in proc.stdout
