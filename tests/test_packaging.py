"""The package as a user installs it: a wheel with its configs, and an import graph without cycles."""
from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "icehpc"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every icehpc module that ``path`` imports, at top level or inside functions (static)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("icehpc")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("icehpc"):
                continue
            for alias in node.names:  # `from . import dist` imports the module icehpc.dist
                sub = f"{mod}.{alias.name}"
                out.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (ROOT / Path(*sub.split("."))).is_dir() else mod)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            out.add(node.args[0].value)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {_module_name(p): set() for p in PKG.rglob("*.py")}
    for p in PKG.rglob("*.py"):
        me = _module_name(p)
        # a module importing icehpc.a.b also runs icehpc/__init__ and icehpc/a/__init__: those
        # only hold docstrings, so the edge that matters is to the module itself
        graph[me] = {m for m in _imports(p) if m in graph and m != me}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


LAYERS = {"icehpc": 0, "icehpc.config": 0, "icehpc.dist": 0, "icehpc.fileio": 0, "icehpc.vmf": 0,
          "icehpc.data": 1, "icehpc.ssl": 2, "icehpc.analysis": 3, "icehpc.run": 4, "icehpc.__main__": 5}


def _layer(module: str) -> int:
    for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"module {module} belongs to no layer")


def test_import_graph_has_no_cycle_and_points_only_down():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"
    upward = [(a, b) for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, f"imports that point up a layer: {upward}"


def test_cycle_finder_sees_a_planted_cycle():
    graph = import_graph()
    graph["icehpc.fileio"] = graph["icehpc.fileio"] | {"icehpc.run.pipeline"}
    assert find_cycle(graph) is not None


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    tree = {_module_name(p.parent) for p in PKG.rglob("__init__.py")} | {"icehpc.configs"}
    assert listed == tree


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    """A non-editable install finds its shipped configs: kappa on built-in defaults, the pipeline
    plan from the shipped demo config, and a named shipped config, all from an empty folder."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=600, capture_output=True)
    wheel = next(wheels.glob("icehpc-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=600, capture_output=True)
    assert (target / "icehpc" / "configs" / "demo.yaml").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    from kappa_helpers import write_store

    store = write_store(tmp_path / "store", np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32),
                        {"habit": np.array(["a", "b", "c"] * 100)})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)

    def icehpc(*args):
        # PYTHONPATH comes before the venv's editable install, so the wheel's icehpc is imported
        return subprocess.run([sys.executable, "-m", "icehpc", *args], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=300)

    where = icehpc("pipeline", "--help")
    assert where.returncode == 0, where.stderr
    res = icehpc("kappa", str(store), "--out", "k", "bootstrap=0", "min_count=5", "groupings=[habit]")
    assert res.returncode == 0, res.stderr
    assert (empty / "k" / "kappa.json").is_file()
    res = icehpc("pipeline", "--plan", "--out", "demo")
    assert res.returncode == 0, res.stderr
    assert "pretrain-tiny-cpu.yaml" in res.stdout and str(target) in res.stdout
    res = icehpc("pipeline", "--plan", "--out", "demo", "--config", "demo.yaml")
    assert res.returncode == 0, res.stderr
    res = icehpc("kappa", str(store), "--out", "k2", "--config", "mycfgs/kappa.yaml")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
