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


def _commands() -> list[pathlib.Path]:
  """Every file with a ``__main__`` block: main.py, the tools, data_prep and bench."""
  candidates = [ROOT / "main.py", *_modules(LIBRARY / "tools"), *_modules(ROOT / "data_prep"),
                *_modules(ROOT / "bench")]
  return [p for p in candidates if '__name__ == "__main__"' in p.read_text()]


def _flag_names(tree: ast.AST) -> list[str]:
  """The names given to absl / ml_collections flag definitions (``DEFINE_*("name", ...)``)."""
  names = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_") and node.args
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names.append(node.args[0].value)
  return names


def test_every_command_uses_absl_flags_with_underscores_and_the_cli_wrapper():
  """One flag convention (README, "Commands and exit codes"): absl flags named in lower case
  with underscores, and `cli.run`, which makes --help exit 0 and user errors one line."""
  commands = _commands()
  assert {p.relative_to(ROOT).as_posix() for p in commands} >= {
      "main.py", "mfer_jax/tools/predict.py", "data_prep/build.py", "bench/train.py"}
  for path in commands:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    assert "argparse" not in _imports(path), f"{where} uses argparse"
    names = _flag_names(tree)
    bad = [n for n in names if not n.replace("_", "").isalnum() or n != n.lower()]
    assert not bad, f"{where} defines flags {bad}: use lower_case_with_underscores"
    main_block = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)]
    calls = {ast.unparse(c.func) for n in main_block for c in ast.walk(n)
             if isinstance(c, ast.Call)}
    assert "cli.run" in calls and "app.run" not in calls, f"{where}: run main with cli.run"
