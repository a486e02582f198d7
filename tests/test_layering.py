"""The package's layers point one way, read from the source (every import, lazy and TYPE_CHECKING ones too):
model code (torch, numpy, safetensors: the top level, the shared training loop `lego.training` and the methods on
it, `lego.methods`) <- data <- shared run metadata and plotting helpers (lego.common) <- the
pipeline <- the report <- the entry points (train.py, experiments/). README's Layout section draws the same."""

import ast
import sys
from pathlib import Path

import pytest

from tests.launch import REPO

LEGO = REPO / "lego"
# the package's top level, the training loop every method shares and the methods on it (`LEGOBlock.fit` runs one)
TRAINING = [path for package in ("training", "methods") for path in (LEGO / package).glob("*.py")]
MODEL_CODE = {
    "lego", *(f"lego.{path.stem}" for path in LEGO.glob("*.py") if path.stem != "__init__"),
    *(f"lego.{path.parent.name}" + ("" if path.stem == "__init__" else f".{path.stem}") for path in TRAINING),
}  # fmt: skip
UTILITIES = {"lego.errors", "lego.atomic", "lego.memory"}  # model-layer modules without torch that every layer may use


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_local_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The modules `path` imports; `from package import module` counts as the module."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{module}.{a.name}" if _is_local_module(f"{module}.{a.name}") else module for a in node.names}
    return found


IMPORTS = {_module_name(path): _imports(path) for path in sorted(LEGO.rglob("*.py"))}


def _modules(prefix: str) -> dict[str, set[str]]:
    return {name: found for name, found in IMPORTS.items() if name == prefix or name.startswith(f"{prefix}.")}


def _lego(found: set[str]) -> set[str]:
    return {name for name in found if name.split(".")[0] == "lego"}


def _third_party(found: set[str]) -> set[str]:
    return {name.split(".")[0] for name in found if name.split(".")[0] not in {*sys.stdlib_module_names, "lego"}}


def test_the_source_is_read():
    assert "lego.pipeline.runner" in IMPORTS and "lego.pipeline.config" in IMPORTS["lego.pipeline.runner"]
    assert "lego.distributed" in IMPORTS["lego.fitting"]  # `from lego import distributed`


@pytest.mark.parametrize("module", sorted(MODEL_CODE))
def test_model_code_imports_only_torch_numpy_safetensors_and_model_code(module):
    found = IMPORTS[module]
    assert _third_party(found) <= {"torch", "numpy", "safetensors"}, module
    assert _lego(found) <= MODEL_CODE, module


def test_data_imports_no_model_code_and_nothing_above_it():
    for module, found in _modules("lego.data").items():
        assert {name for name in _lego(found) if not name.startswith("lego.data")} <= UTILITIES, module


def test_shared_run_metadata_and_plotting_sit_below_pipeline_and_report():
    for module, found in _modules("lego.common").items():
        assert {name for name in _lego(found) if not name.startswith("lego.common")} <= UTILITIES, module
    assert not _third_party(IMPORTS["lego.common.runmeta"])  # the standard library only: importable from anywhere


def test_the_pipeline_never_imports_the_report():
    for module, found in _modules("lego.pipeline").items():
        assert not {name for name in found if name.startswith("lego.report")}, module


def test_matplotlib_is_imported_by_the_plot_modules_only():
    users = {module for module, found in IMPORTS.items() if "matplotlib" in _third_party(found)}
    assert users == {"lego.common.plotting", "lego.pipeline.plots", "lego.report.plots"}


def test_lego_never_imports_the_entry_points():
    for module, found in IMPORTS.items():
        assert not {name for name in found if name.split(".")[0] in ("experiments", "train", "tests")}, module
