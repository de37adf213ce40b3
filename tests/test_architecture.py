"""The package's structure rules that import-linter does not check (see docs/ARCHITECTURE.md).

* No module imports a private name (``_name``) of another kerasnuc module: what other modules
  use is public, documented API.
* No file in kerasnuc/ is longer than 600 lines unless its docstring says why it is one concept
  ("One cohesive concept: ...").
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kerasnuc"
MAX_LINES = 600
COHESIVE_MARK = "One cohesive concept"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in _python_files():
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("kerasnuc") or source == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}:{node.lineno} imports {source}.{alias.name}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_long_files_say_why_they_are_one_concept():
    long = []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MAX_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if COHESIVE_MARK not in docstring:
                long.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not long, (
        f"files above {MAX_LINES} lines whose docstring does not say '{COHESIVE_MARK}: ...':\n"
        + "\n".join(long)
    )
