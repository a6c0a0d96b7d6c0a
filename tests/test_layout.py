"""The package's import graph: imports flow one way down the layers, with no circles."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "teacherlm_jax"

# Lowest first. A module may import its own layer's package and any lower layer, never a higher
# one; the three stages sit side by side and do not import one another.
LAYERS = (
    ("storage",),
    ("data", "runtime"),
    ("models",),
    ("training", "annotation", "evaluation"),
    ("pipeline",),
    ("cli", "benchmarks"),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part_of(module: str) -> str:
  """'teacherlm_jax.models.hf' -> 'models'."""
  return module.split(".")[1]


def _module_name(path: pathlib.Path) -> str:
  relative = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
  return ".".join(parts)


def _imports(path: pathlib.Path):
  """Every teacherlm_jax module `path` imports, at any depth (function-level imports too)."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      if name.startswith("teacherlm_jax.") and _is_module(name):
        yield node.lineno, name


def _is_module(name: str) -> bool:
  path = PACKAGE.parent / name.replace(".", "/")
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph():
  graph = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    graph[_module_name(path)] = (path, sorted(set(_imports(path))))
  return graph


def test_every_package_has_a_layer():
  parts = {_part_of(module) for module in _graph() if module.count(".") >= 1}
  assert parts <= set(RANK), f"packages with no layer in LAYERS: {sorted(parts - set(RANK))}"


def test_imports_never_run_up_the_layers_or_across_stages():
  violations = []
  for module, (path, imports) in _graph().items():
    if module.count(".") < 1:
      continue
    here = _part_of(module)
    for line, imported in imports:
      there = _part_of(imported)
      if there == here:
        continue
      if RANK[there] >= RANK[here]:
        violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {imported}")
  assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_no_import_circles():
  modules = {module: [name for _, name in imports] for module, (_, imports) in _graph().items()}
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for imported in modules.get(module, ()):
      if imported not in modules:
        continue
      if state.get(imported) == "open":
        cycle = stack[stack.index(imported):] + [imported]
        pytest.fail("import circle: " + " -> ".join(cycle))
      if imported not in state:
        visit(imported, stack + [imported])
    state[module] = "done"

  for module in modules:
    if module not in state:
      visit(module, [module])
