"""The library's shape, read from its imports (ast, nothing executed): layers that import only downward,
no import cycles, and no imports of our own modules hidden inside functions.

    0 errors, the package itself     1 recipe     2 core     3 hub, labeling, tasks, plan     4 stages
cli sits on top of everything and the library never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_rlhf"
CLI = "lora_rlhf_cli"  # cli/, installed under this name (pyproject.toml)
LAYERS = {"errors": 0, "recipe": 1, "core": 2, "hub": 3, "labeling": 3, "tasks": 3, "plan": 3, "stages": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # `lora_rlhf` itself: the version string
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: every module lives in one of {sorted(LAYERS)} (add it to LAYERS "
                             "only if a new layer is meant)")
    return LAYERS[parts[1]]


def our_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lora_rlhf/cli module, line, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lora_rlhf.hub import client` imports lora_rlhf.hub.client when that is a module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if _is_module(f"{node.module}.{a.name}")]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("lora_rlhf", CLI):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def graph() -> dict[str, set[str]]:
    return {m: {name for name, _, _ in our_imports(p) if name in MODULES and name != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_only_downward(module):
    mine = layer(module)
    for name, line, _ in our_imports(MODULES[module]):
        assert not name.startswith(CLI), f"{module}:{line} imports the CLI ({name}): the library never does"
        assert layer(name) <= mine, (f"{module}:{line} imports {name}, a higher layer "
                                     f"({layer(name)} > {mine}); move the shared code down instead")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_of_our_own_modules_inside_functions(module):
    hidden = [(name, line) for name, line, top in our_imports(MODULES[module]) if not top]
    assert not hidden, f"{module}: function-level imports of our modules hide the import graph: {hidden}"


def test_no_import_cycles():
    edges, state, stack = graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The rules themselves: an upward import and a cycle are found (so the tests above can fail)."""
    assert layer("lora_rlhf.core.base") == 2 and layer("lora_rlhf.stages.ppo.trainer") == 4
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom lora_rlhf.stages.sft import run_sft\n\ndef f():\n    from lora_rlhf.core import io\n")
    found = our_imports(bad)
    assert ("lora_rlhf.stages.sft", 2, True) in found and ("lora_rlhf.core.io", 5, False) in found
    assert layer("lora_rlhf.stages.sft") > layer("lora_rlhf.core.loading")


def auto_class_loads(path: Path) -> list[int]:
    """Lines calling `Auto*.from_pretrained(...)` (a model, tokenizer or config read from disk or the Hub)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
            and node.func.value.id.startswith("Auto")]


def test_only_the_loading_module_loads_models_tokenizers_and_configs():
    """One loader: every model, tokenizer and config read goes through core/loading.py. Two exceptions: the
    one-time conversion of the embedded GGUF (core/models.py) and the tokenizer hub/merge.py ships beside a
    merged model."""
    allowed = {"lora_rlhf.core.loading", "lora_rlhf.core.models", "lora_rlhf.hub.merge"}
    for module, path in MODULES.items():
        if module not in allowed:
            assert not auto_class_loads(path), f"{module} loads with from_pretrained: use lora_rlhf.core.loading"
    assert auto_class_loads(MODULES["lora_rlhf.core.loading"])  # the check sees the loader's own calls
