"""`python train.py --help` and README's "Config groups" table describe every config group option in one line, the
first comment line of its file in conf/."""

import re
import subprocess
import sys

from lego.pipeline.config_help import option_descriptions
from tests.launch import REPO

DESCRIPTIONS = option_descriptions(REPO / "conf")


def test_every_option_has_a_description():
    assert {"experiment", "model", "data", "wandb", "hydra/launcher"} <= set(DESCRIPTIONS)
    missing = [f"conf/{group}/{option}.yaml" for group, options in DESCRIPTIONS.items() for option, text in
               options.items() if not text]  # fmt: skip
    assert not missing, f"give these files a first comment line saying what they are: {missing}"


def test_help_lists_every_option_with_its_description():
    command = [sys.executable, "train.py", "+experiment=tiny", "--help"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    for group, options in DESCRIPTIONS.items():
        listed = groups.split(f"\n{group}:\n")[1].split("\n")[: len(options)]
        for line, (option, text) in zip(listed, options.items(), strict=True):
            assert re.fullmatch(rf"  [ *] {re.escape(option)} +{re.escape(text)}", line), line
    assert "  * tiny " in groups and "  * bytes " in groups  # what +experiment=tiny composes is marked


def test_readme_config_groups_table_matches_the_files():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Config groups")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| (.*) \|$", section, flags=re.M)
    table = {}
    for group, option, text in rows:
        table.setdefault(group, {})[option] = text
    expected = "\n".join(f"| `{g}` | `{o}` | {t} |" for g, options in DESCRIPTIONS.items() for o, t in options.items())
    assert table == DESCRIPTIONS, f"README's Config groups table should read:\n{expected}"
