"""Who may import whom (README, "Architecture"): the library core never reaches up into the job layer.

Checked on the source with `ast`, so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_edit"
CORE = [PACKAGE / "editors", PACKAGE / "sparse", PACKAGE / "locate", PACKAGE / "metrics", PACKAGE / "models.py",
        PACKAGE / "tokens.py"]
"""The library core: models, sparse components, editors, locating, metrics (and tokenisation)."""
FORBIDDEN = ("lightning_edit.jobs", "lightning_edit.cli", "modules", "datamodules", "lightning")
"""The job layer (jobs, CLI, LightningModules, LightningDataModules) and Lightning itself."""


def imported_modules(path: Path, root: Path = ROOT) -> list[str]:
    """Every module `path` imports (relative imports resolved against its package under `root`)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module)
    return found


def forbidden_imports(path: Path, root: Path = ROOT) -> list[str]:
    return [name for name in imported_modules(path, root)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


def core_files() -> list[Path]:
    return sorted(p for root in CORE for p in ([root] if root.is_file() else root.rglob("*.py")))


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_core_does_not_import_the_job_layer(path):
    assert forbidden_imports(path) == [], f"{path.relative_to(ROOT)} imports the job layer"


def test_the_check_sees_every_kind_of_import(tmp_path):
    module = tmp_path / "lightning_edit" / "editors" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("import lightning\nfrom lightning.pytorch import Trainer\nimport lightning_edit.models\n"
                      "def f():\n    from lightning_edit.jobs import edit\n    from datamodules.edits import EditStream\n"
                      "from ..jobs import components\nfrom . import gates\n")
    assert sorted(imported_modules(module, tmp_path)) == [
        "datamodules.edits", "lightning", "lightning.pytorch", "lightning_edit.editors", "lightning_edit.jobs",
        "lightning_edit.jobs", "lightning_edit.models"]
    assert sorted(forbidden_imports(module, tmp_path)) == [
        "datamodules.edits", "lightning", "lightning.pytorch", "lightning_edit.jobs", "lightning_edit.jobs"]
