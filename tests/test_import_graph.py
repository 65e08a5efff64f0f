"""The library's layers (docs/conventions.md): no import cycle, no arrow from a lower layer to a higher one,
and the programs (experiments, configs) import the library, never the reverse."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import find_cycle, import_graph, layer_violations

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer or lower ones. Kept in step with docs/conventions.md.
LAYERS = [
    ("errors", "spec", "tree", "rng", "precision", "boxes", "topk", "nms", "extent", "anchors"),
    ("nn", "assign", "focal_loss", "losses", "postprocess", "optim"),
    ("accel", "model"),
    ("detector",),
    ("train",),
    ("data", "eval", "checkpoint", "interop", "viz", "class_count"),
    ("parallel", "schema"),
    ("trained", "export", "predictor"),
    ("engine",),
]


def test_the_library_has_no_import_cycle():
    graph = import_graph(ROOT / "retina_fn")
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_layer_imports_a_higher_one():
    assert layer_violations(import_graph(ROOT / "retina_fn"), LAYERS) == []


def test_the_layers_in_the_docs_are_the_tested_ones():
    text = (ROOT / "docs" / "conventions.md").read_text()
    for i, names in enumerate(LAYERS):
        assert f"| {i} | " + ", ".join(f"`{n}`" for n in names) + " |" in text, f"layer {i} of docs/conventions.md"


def test_the_library_never_imports_the_programs():
    for path in (ROOT / "retina_fn").rglob("*.py"):
        source = path.read_text()
        for program in ("experiments", "configs", "tests"):
            assert f"from {program}" not in source and f"import {program}" not in source, (path, program)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_the_checker_finds_cycles_and_upward_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from pkg.high import g\n",  # a lazy import counts
        "high/__init__.py": "from pkg.high import mid\n",
        "high/mid.py": "from pkg import low\nfrom . import other\n",
        "high/other.py": "import os\n",
    })
    graph = import_graph(root)
    assert graph == {"pkg": set(), "pkg.low": {"pkg.high"}, "pkg.high": {"pkg.high.mid"},
                     "pkg.high.mid": {"pkg.low", "pkg.high.other"}, "pkg.high.other": set()}
    assert find_cycle(graph) == ["pkg.high", "pkg.high.mid", "pkg.low", "pkg.high"]
    assert layer_violations(graph, [("low",), ("high",)]) == ["pkg.low (layer 0) -> pkg.high (layer 1)"]
    assert layer_violations(graph, [("high",)]) == ["pkg.low is in no layer"]
    graph["pkg.low"] = set()
    assert find_cycle(graph) is None
