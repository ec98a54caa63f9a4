"""The package's import graph: dependencies point one way (README, "Layout")."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "mfer_jax"


def _imports(path: pathlib.Path) -> set[str]:
  """Every module name an import statement in ``path`` names (top-level and nested)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _modules(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_library_never_imports_data_prep_or_the_tests():
  bad = {}
  for path in _modules(LIBRARY):
    names = {n for n in _imports(path) if n.split(".")[0] in ("data_prep", "tests", "bench")}
    if names:
      bad[str(path.relative_to(ROOT))] = sorted(names)
  assert not bad


def test_only_tools_import_tools():
  for path in _modules(LIBRARY):
    if path.parent.name == "tools":
      continue
    bad = {n for n in _imports(path) if n.startswith("mfer_jax.tools")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_constants_and_errors_import_nothing_of_ours():
  for name in ("constants.py", "errors.py", "files.py"):
    ours = {n for n in _imports(LIBRARY / name) if n.startswith("mfer_jax")}
    assert not ours, f"mfer_jax/{name} imports {sorted(ours)}"


def test_the_data_prep_tools_depend_on_the_library_not_the_reverse():
  uses = set()
  for path in _modules(ROOT / "data_prep"):
    uses |= {n.split(".")[0] for n in _imports(path)}
  assert "mfer_jax" in uses
