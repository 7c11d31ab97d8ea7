"""The package's module graph: no import cycles, lazy (in-function) imports included.

A cycle such as the one `teacher.py` <-> `convert/diffusers_unet.py` had hides a layering error
and breaks as soon as either import moves to the top of its file.
"""

import ast
import pathlib

import networkx as nx

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "binarydm_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: pathlib.Path) -> str:
  """The package a file's relative imports start from (for `__init__.py`, its own)."""
  return ".".join(path.parent.relative_to(PACKAGE.parent).parts)


def _imported(tree: ast.AST, modules: set[str], package: str) -> set[str]:
  """The package modules a file imports anywhere in it (`from binarydm_jax import x` names x).

  Relative imports count from `package`: `from . import x` names package.x, `from .y import z`
  names package.y (and package.y.z).
  """
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level > 0:
      base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
      if node.module:
        base = f"{base}.{node.module}"
        found.add(base)
      found |= {f"{base}.{alias.name}" for alias in node.names}
  return found & modules


def import_graph() -> nx.DiGraph:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = nx.DiGraph()
  for name, path in files.items():
    graph.add_node(name)
    for target in _imported(ast.parse(path.read_text()), set(files), _package(path)):
      # A package's __init__ re-exporting its own modules is not a cycle of layers.
      if target != name and not target.startswith(name + "."):
        graph.add_edge(name, target)
  return graph


def test_the_graph_sees_the_known_edges():
  graph = import_graph()
  assert graph.has_edge("binarydm_jax.training.pipeline", "binarydm_jax.training.qat_stage")
  assert graph.has_edge(
    "binarydm_jax.convert.teacher", "binarydm_jax.convert.diffusers_unet"
  )  # Lazy.
  assert graph.has_edge("binarydm_jax.export.writer", "binarydm_jax.export.layout")  # from . import
  assert graph.has_edge("binarydm_jax.export.layout", "binarydm_jax.export.packing")  # from .x


def test_relative_imports_resolve_from_the_files_package():
  modules = {"binarydm_jax.export.layout", "binarydm_jax.export.packing", "binarydm_jax.errors"}
  tree = ast.parse("from . import layout\nfrom .packing import pack_signs\nfrom .. import errors")
  assert _imported(tree, modules, "binarydm_jax.export") == modules


def test_no_import_cycles():
  cycles = list(nx.simple_cycles(import_graph()))
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


# Imported only through `binarydm_jax.runtime.lazy_imports` (they import TensorFlow, which takes seconds).
TENSORFLOW_MODULES = (
  "tensorflow",
  "tensorflow_datasets",
  "clu.metric_writers",
  "clu.periodic_actions",
)


def _runtime_imports(tree: ast.AST) -> set[str]:
  """Modules a file imports anywhere but under `if TYPE_CHECKING:` (`from a import b`: a, a.b)."""
  type_only = {
    id(child)
    for node in ast.walk(tree)
    if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    for child in ast.walk(node)
  }
  found = set()
  for node in ast.walk(tree):
    if id(node) in type_only:
      continue
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def test_tensorflow_is_imported_only_through_lazy_imports():
  offenders = sorted(
    f"{_module_name(path)}: {module}"
    for path in PACKAGE.rglob("*.py")
    if path.name != "lazy_imports.py"
    for module in _runtime_imports(ast.parse(path.read_text()))
    if module.startswith(TENSORFLOW_MODULES)
  )
  assert not offenders, offenders
  assert "clu.metric_writers" in _runtime_imports(
    ast.parse((PACKAGE / "runtime" / "lazy_imports.py").read_text())
  )


# The packages by role, lowest first: a package imports only from those before it (and from the
# top-level modules `errors`, `diffusion`, `student`).
LAYERS = ("runtime", "quant", "models", "data", "export", "sampling", "evaluation", "training")
BASE_MODULES = ("errors", "diffusion", "student")


def _top(module: str) -> str:
  return module.split(".")[1] if "." in module else module


def test_packages_import_only_lower_layers():
  graph = import_graph()
  upward = sorted(
    f"{a} -> {b}"
    for a, b in graph.edges
    if _top(a) in LAYERS and _top(b) in LAYERS and LAYERS.index(_top(b)) > LAYERS.index(_top(a))
  )
  assert not upward, upward
  base_imports = sorted(
    f"{a} -> {b}"
    for a, b in graph.edges
    if _top(a) in BASE_MODULES and _top(b) in LAYERS[LAYERS.index("data") :]
  )
  assert not base_imports, base_imports


def test_the_top_level_holds_commands_and_a_few_shared_modules():
  modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
  assert len(modules) <= 12, modules
  packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
  assert set(LAYERS) <= packages, packages
