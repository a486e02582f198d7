"""What `python train.py --help` says about the config groups: every option of every group under `conf/` with a
one-line description, the first comment line of its YAML file (after `# @package ...`).

The help reads the files when it is shown, so it cannot drift from them; README's "Config groups" table holds the
same lines and a test compares the two (tests/pipeline/test_help.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def option_descriptions(conf_dir: str | Path) -> dict[str, dict[str, str]]:
    """`{group: {option: description}}` for every option under `conf_dir`, groups as Hydra names them
    (`model`, `hydra/launcher`), sorted; an option whose file has no comment line gets ""."""
    conf_dir = Path(conf_dir)
    groups: dict[str, dict[str, str]] = {}
    for path in sorted(conf_dir.rglob("*.yaml")):
        if path.parent != conf_dir:  # files in conf/ itself are primary configs, not options
            groups.setdefault(path.parent.relative_to(conf_dir).as_posix(), {})[path.stem] = _first_comment(path)
    return dict(sorted(groups.items()))


def format_config_groups(*, _root_: DictConfig) -> str:
    """The help's group listing (the `config_groups` resolver of conf/hydra/help/lego.yaml): each group, then its
    options with their descriptions, `*` marking the option the composed config uses."""
    conf_dir = next(s.path for s in _root_.hydra.runtime.config_sources if s.provider == "main" and s.schema == "file")
    choices = _root_.hydra.runtime.choices
    lines = []
    for group, options in option_descriptions(conf_dir).items():
        lines.append(f"{group}:")
        width = max(map(len, options))
        for option, description in options.items():
            mark = "*" if choices.get(group) == option else " "
            lines.append(f"  {mark} {option:<{width}}  {description}")
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the template with string.Template


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("#").strip()
    return ""
