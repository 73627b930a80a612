"""The layers hold: import-linter's contracts (pyproject [tool.importlinter]), and no module
imports a private name (`_x`) of another.

console > flows > pipeline > models, one way; prefect only in flows and the console, ray only
in pipeline and above, boto3 only in pipeline.storage, bench imported by no library layer.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("console", "flows", "pipeline", "models", "bench", "tests")

# Private names still imported across modules, each to be made public (or the import removed)
# by the work that owns it; the list only shrinks: an entry that no longer occurs fails the
# test, so whoever fixes one also deletes it here.
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), f"{lint_imports} missing: install the dev extra (import-linter)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's packages, not an install
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and " KEPT" in result.stdout


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path):
    """(line, dotted name) of every project name `path` imports (`from m import n` is m.n)."""
    me = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                module = ".".join([*package, *([module] if module else [])])
            if module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node.lineno, alias.name


def test_no_private_name_is_imported_from_another_module():
    found = set()
    lines = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, name in _imported_names(path):
                if any(_private(part) for part in name.split(".")):
                    where = path.relative_to(REPO).as_posix()
                    found.add((where, name))
                    if (where, name) not in ALLOWED_PRIVATE_IMPORTS:
                        lines.append(f"{where}:{line} imports {name}")
    assert not lines, "private names imported from another module:\n" + "\n".join(lines)
    fixed = sorted(ALLOWED_PRIVATE_IMPORTS - found)
    assert not fixed, f"no longer imported, remove from ALLOWED_PRIVATE_IMPORTS: {fixed}"
