"""The package boundaries DESIGN.md and the README state, checked on every import statement
(function-level ones included): the components depend on `kuberft_core` and never on each other;
only the operator's composition modules put them together; no image installs another's extras."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "kuberft_core": REPO / "operator" / "kuberft_core",
    "kuberft_operator": REPO / "operator" / "kuberft_operator",
    "kuberft_trainer": REPO / "trainer_image" / "kuberft_trainer",
    "kuberft_reward": REPO / "reward_image" / "kuberft_reward",
    "kuberft_serve": REPO / "serve_image" / "kuberft_serve",
}
# What each package may import besides itself. The operator package is the application: its
# composition modules (`kuberft run` runs a whole job on one machine; `kuberft serve --job`
# serves what it trained) put the components together, and nothing else in it may.
ALLOWED = {
    "kuberft_core": set(),
    "kuberft_trainer": {"kuberft_core"},
    "kuberft_reward": {"kuberft_core"},
    "kuberft_serve": {"kuberft_core"},
    "kuberft_operator": {"kuberft_core"},
}
COMPOSITION_MODULES = {"kuberft_operator.local_runner", "kuberft_operator.cli_run"}
# The core is installed everywhere, the operator image included: nothing heavy at import time.
HEAVY = {"torch", "transformers", "peft", "triton", "numpy", "kopf", "kubernetes", "tokenizers"}


def modules():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            if relative.parts[0] == "tasks":  # task programs are data the sandbox runs, not code we import
                continue
            name = ".".join((package, *relative.parts)).removesuffix(".__init__")
            yield package, name, path


def imports(path: Path, module: str):
    """(imported top-level package, line, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package_parts = module.split(".")[:-1] if not path.name == "__init__.py" else module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                yield base[0], node.lineno, id(node) in top_level
            elif node.module:
                yield node.module.split(".")[0], node.lineno, id(node) in top_level


def test_components_import_only_the_core_and_themselves():
    crossings = []
    for package, module, path in modules():
        allowed = ALLOWED[package] | {package}
        if module in COMPOSITION_MODULES:
            allowed |= set(PACKAGES)
        for imported, line, _ in imports(path, module):
            if imported.startswith("kuberft_") and imported not in allowed:
                crossings.append(f"{path.relative_to(REPO)}:{line} ({module}) imports {imported}")
    assert crossings == []


def test_the_core_imports_nothing_heavy_at_module_level():
    heavy = [f"{path.relative_to(REPO)}:{line} imports {imported}"
             for package, module, path in modules() if package == "kuberft_core"
             for imported, line, at_module_level in imports(path, module)
             if at_module_level and imported in HEAVY]
    assert heavy == []


def test_the_checker_sees_a_crossing(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from kuberft_trainer.train import Trainer\n")
    found = [imported for imported, _, _ in imports(planted, "kuberft_serve.planted")]
    assert found == ["kuberft_trainer"]
    relative = tmp_path / "rel.py"
    relative.write_text("from ..kuberft_x import y\nfrom .sibling import z\n")
    assert [i for i, _, _ in imports(relative, "kuberft_serve.sub.rel")] == ["kuberft_serve", "kuberft_serve"]


@pytest.mark.parametrize("dockerfile,extras", [
    ("trainer_image/Dockerfile", {"trainer"}),
    ("reward_image/Dockerfile", {"reward"}),
    ("serve_image/Dockerfile", {"serve"}),
    ("operator/Dockerfile", {"operator"}),
])
def test_each_image_installs_its_own_extra_only(dockerfile, extras):
    installed = set()
    for group in re.findall(r'"\.\[([a-z,]+)\]"', (REPO / dockerfile).read_text()):
        installed |= set(group.split(","))
    assert installed == extras


def test_shared_paths_are_defined_once_in_the_core():
    """A module-level constant holding one of kuberft_core.paths' values is a second copy that
    can drift (the operator reporting an adapter where the trainer did not write it)."""
    from kuberft_core import paths

    shared = {value: name for name, value in vars(paths).items() if name.isupper() and isinstance(value, str)}
    copies = []
    for package, module, path in modules():
        if module == "kuberft_core.paths":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in shared:
                copies.append(f"{path.relative_to(REPO)}:{node.lineno} copies paths.{shared[node.value.value]}")
    assert copies == []


def test_every_module_imports():
    """A moved module leaves no stale import behind (a relative `from . import moved` included)."""
    import importlib

    failures = []
    for _, module, _ in modules():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - report every module that fails, with why
            failures.append(f"{module}: {error!r}")
    assert failures == []
