"""scripts/setup.sh and scripts/test.sh say what they do, step by step, and set up only once. They run here in a
copy of the tree with a stand-in Python that records each call instead of installing anything."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch import REPO

FAKE_PYTHON = """#!/bin/sh
# Records its arguments; `-m venv DIR` makes DIR/bin/python (itself); fails when an argument is $FAKE_FAIL.
echo "$*" >> "$FAKE_LOG"
for arg in "$@"; do
    if [ "$arg" = "$FAKE_FAIL" ]; then echo "ERROR: No matching distribution found for $arg"; exit 1; fi
done
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/ruff"; fi
"""


@pytest.fixture
def tree(tmp_path) -> Path:
    """scripts/ and pyproject.toml, nothing installed."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup.sh", "test.sh"):
        shutil.copy(REPO / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def run_script(tree: Path, name: str, *args: str, fail: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tree / "fake_python"), "FAKE_LOG": str(tree / "calls"),
           "FAKE_FAIL": fail}  # fmt: skip
    return subprocess.run(["bash", str(tree / "scripts" / name), *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def calls(tree: Path) -> list[str]:
    log = tree / "calls"
    return log.read_text().splitlines() if log.exists() else []


def test_setup_prints_each_step_and_then_only_that_it_is_up_to_date(tree):
    first = run_script(tree, "setup.sh")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert [line.split(" ...")[0] for line in lines if line.endswith(" ...")] == [
        f"setup: creating .venv with {tree / 'fake_python'}",
        "setup: upgrading pip",
        "setup: installing torch==2.13.0 (CPU build, about a minute)",
        "setup: installing LEGO and its dev tools (pip install -e '.[dev]', about a minute)",
    ]
    assert lines[-1].startswith("setup: done in ") and "source .venv/bin/activate" in lines[-1]
    assert first.stderr == ""
    assert calls(tree) == ["-m venv .venv", "-m pip install --upgrade pip", "-m pip install torch==2.13.0",
                           "-m pip install -e .[dev]"]  # fmt: skip

    again = run_script(tree, "setup.sh")
    assert again.returncode == 0 and again.stdout == "setup: .venv is up to date\n"
    assert len(calls(tree)) == 4  # nothing installed again

    with open(tree / "pyproject.toml", "a") as handle:
        handle.write("# a changed dependency\n")
    changed = run_script(tree, "setup.sh")
    assert changed.returncode == 0 and "creating .venv" not in changed.stdout
    assert calls(tree)[4:] == calls(tree)[1:4]  # the same three installs into the existing .venv


def test_a_failed_install_shows_pips_output_and_sets_nothing_up(tree):
    proc = run_script(tree, "setup.sh", fail="torch==2.13.0")
    assert proc.returncode == 1
    assert "ERROR: No matching distribution found for torch==2.13.0" in proc.stderr
    failed = "setup: failed while installing torch==2.13.0 (CPU build, about a minute) (its output above)"
    assert proc.stderr.splitlines()[-1] == failed
    assert not (tree / ".venv" / ".lego-installed").exists()
    assert run_script(tree, "setup.sh").stdout != "setup: .venv is up to date\n"  # the next call installs again


def readme_suite_minutes() -> str:
    """The suite's time as the README's "Two commands" states it, the one place it is measured for."""
    found = re.search(r"bash scripts/test\.sh .*: ~(\d+) min", (REPO / "README.md").read_text())
    assert found, "README.md no longer states the test suite's time beside `bash scripts/test.sh`"
    return found.group(1)


def test_test_script_names_what_it_runs(tree):
    assert run_script(tree, "setup.sh").returncode == 0
    whole = run_script(tree, "test.sh")
    assert whole.returncode == 0, whole.stderr
    minutes = readme_suite_minutes()
    assert whole.stdout.splitlines()[1:] == [
        "test: ruff check .",
        f"test: pytest, the whole suite: about {minutes} minutes on 2 quiet cores, far longer on a busy machine",
    ]
    assert calls(tree)[-2:] == ["check .", "-m pytest"]
    some = run_script(tree, "test.sh", "tests/model", "-x")
    assert some.stdout.splitlines()[-1] == "test: pytest tests/model -x"
    assert calls(tree)[-1] == "-m pytest tests/model -x"
