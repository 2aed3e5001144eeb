"""The package declares what it imports: core dependencies, or extras for the optional pieces."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_moe"
# Imported only where the piece is used, behind a check that names the extra to install.
OPTIONAL = {"triton": "triton", "wandb": "wandb"}


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "lightning_moe"}


def _requirements() -> dict[str, set[str]]:
    """Distribution name (normalised) -> extras that declare it ('' for a core dependency)."""
    declared: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("lightning-moe") or []:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        declared.setdefault(name, set()).add(extra.group(1) if extra else "")
    return declared


def test_every_imported_distribution_is_declared() -> None:
    declared = _requirements()
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(_imported_top_level_modules()):
        if module in OPTIONAL:
            assert OPTIONAL[module] in declared.get(module, set()), f"{module} needs the extra [{OPTIONAL[module]}]"
            continue
        names = [d.lower().replace("_", "-") for d in distributions.get(module, [module])]
        assert any("" in declared.get(name, set()) for name in names), (
            f"lightning_moe imports {module!r} (distribution {names}) but pyproject.toml does not declare it"
        )
