"""The layers of DESIGN.md: imports only point down, read from every module's source.

    training                   the loop, steps, checkpoints
    configs                    recipes and per-model defaults
    serving                    restore a run for inference, predict, export
    data                       dataset registry, TFDS builders, input pipeline
    weights                    PyTorch / Hugging Face state dicts -> flaxseg variables
    models                     registry, skeleton, layers, backbones, heads
    losses, metrics, inference pure functions
    constants                  facts shared by all

Besides the order: data never imports models or weights, and the exported-model loader
(flaxseg.serving.loader, flaxseg.export) imports neither models nor training.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "flaxseg"
RANK = {
    "training": 7,
    "configs": 6,
    "serving": 5,
    "export": 6,  # the alias of serving.loader kept for `flaxseg.export.load`
    "data": 4,
    "weights": 3,
    "models": 2,
    "losses": 1,
    "metrics": 1,
    "inference": 1,
    "constants": 0,
}
FORBIDDEN = {
    "data": {"models", "weights"},
    "inference": {"losses", "metrics"},
    "serving/loader": {"models", "training", "data", "weights"},
    "export": {"models", "training", "data", "weights"},
}


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def _layer(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else ""


def _flaxseg_imports(path: pathlib.Path) -> set[str]:
    """Top-level flaxseg packages imported anywhere in the file (function bodies too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "flaxseg" and len(parts) > 1 and parts[1] in RANK:
                found.add(parts[1])
    return found


def test_every_package_has_a_rank():
    packages = {_layer(p) for p in _modules()} - {""}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    layer = _layer(path)
    if not layer:
        return  # flaxseg/__init__.py imports nothing of the layers (checked below)
    imported = _flaxseg_imports(path) - {layer}
    upward = sorted(name for name in imported if RANK[name] >= RANK[layer])
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports upward: {upward}"
    key = "/".join(path.relative_to(ROOT).with_suffix("").parts[:2])
    for rule in (layer, key):
        bad = sorted(imported & FORBIDDEN.get(rule, set()))
        assert not bad, f"{path.relative_to(ROOT)} must not import {bad}"


def test_package_root_imports_no_layer():
    assert not _flaxseg_imports(ROOT / "__init__.py")
