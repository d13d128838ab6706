"""The import graph of ``l2d``: every module imports alone, and module-level imports form no cycle
(the token loop drives the model through its methods; it imports nothing back from the model)."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "l2d"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The l2d modules an ``import``/``from ... import`` at module level names."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{a.name}" for a in node.names]
    return [n for n in [target, *names] if n in MODULES]


def _module_level_imports(path: Path) -> set[str]:
    """l2d modules imported at module level (not inside functions, nor under ``if TYPE_CHECKING``)."""
    module, tree = _module_name(path), ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            found |= set(_resolve(module, path.name == "__init__.py", node))
    found.discard(module)
    return found


def _cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_module_level_imports_form_no_cycle():
    # a package's __init__ runs before its submodules: edges into a package are to its __init__
    graph = {_module_name(p): _module_level_imports(p) for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_generation_imports_the_model_for_types_only():
    assert "l2d.model" not in _module_level_imports(PACKAGE / "generation.py")


# One interpreter loads the third-party libraries once; each l2d module is then imported in a fork
# of it that has imported no l2d module yet (as fresh as a new interpreter for l2d, in a fraction of the time).
_FORKED_IMPORTS = """
import os, sys, traceback
import importlib
for lib in ("torch", "transformers", "datasets", "accelerate", "peft", "safetensors", "huggingface_hub", "tqdm",
            "yaml", "numpy", "torchdiffeq", "triton"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("FAILED", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_in_a_fresh_interpreter():
    modules = [m for m in MODULES if not m.endswith("__main__")]  # (that one runs the CLI)
    out = subprocess.run([sys.executable, "-c", _FORKED_IMPORTS, *modules], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-3000:]
