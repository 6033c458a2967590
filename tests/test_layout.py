"""dvc.yaml against the code: every path a stage declares is one the layout module gives it, and
every stage depends on all the library code it runs (so a code change reruns what it affects)."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from pipeline import config, layout
from pipeline.config import TRUSTED_FUNCTIONS, TRUSTED_MODULES
from tests.conftest import ROOT

CODE = ("stages/", "pipeline/")
# The modules of config-named functions (factories, task metrics) each stage imports at run time.
FACTORIES, TASK_METRICS = "pipeline.examples", "pipeline.task_metrics"
RESOLVES = {"convert": {FACTORIES}, "quantize": {FACTORIES}, "validate": {TASK_METRICS},
            "autoselect": {FACTORIES, TASK_METRICS}}


@pytest.fixture(scope="module")
def stages():
    """Every stage of dvc.yaml, resolved for the committed params.yaml: (name, key, deps, outs, module run)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        resolved = []
        for stage in repo.index.stages:
            name, _, key = stage.addressing.partition("@")
            deps = {Path(dep.def_path).as_posix() for dep in stage.deps if type(dep).__name__ != "ParamsDependency"}
            outs = {Path(out.def_path).as_posix() for out in stage.outs}
            command = stage.cmd.split()
            assert command[:2] == ["python", "-m"], f"{stage.addressing}: stages run as `python -m stages.<name>`"
            resolved.append((name, key, deps, outs, command[2]))
    return resolved


def test_every_stage_declares_exactly_the_layouts_paths(stages):
    cfg = config.load(ROOT / "params.yaml")
    assert {name for name, *_ in stages} >= {"prepare", "data", "convert", "quantize", "metadata", "validate", "report"}
    for name, key, deps, outs, _ in stages:
        inputs, outputs = layout.stage_files(name, key, cfg)
        data_deps = {dep for dep in deps if not dep.startswith(CODE)}
        assert data_deps == inputs, f"{name}@{key}: dvc.yaml deps {sorted(data_deps)} != layout {sorted(inputs)}"
        assert outs == outputs, f"{name}@{key}: dvc.yaml outs {sorted(outs)} != layout {sorted(outputs)}"


@lru_cache(maxsize=None)
def _module_file(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def _imports(file: Path) -> frozenset[str]:
    """Every project module `file` imports, at module level or inside functions (not for typing)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(block)}
    package = file.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = set()
    for name in found:
        parts = name.split(".")
        if parts[0] in ("pipeline", "stages"):
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i])))
    return frozenset(modules)


def _closure(start: Path, extra: set[str] = frozenset()) -> set[Path]:
    seen: set[Path] = set()
    todo = [start, *(_module_file(m) for m in extra)]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(_module_file(module) for module in _imports(file))
    return seen


def test_every_stage_depends_on_the_library_code_it_runs(stages):
    named = {reference.partition(":")[0] for reference in TRUSTED_FUNCTIONS} | TRUSTED_MODULES
    assert set().union(*RESOLVES.values()) == named
    for name, key, deps, _, module in stages:
        code = [ROOT / dep for dep in deps if dep.startswith(CODE)]
        runs = _closure(_module_file(module), RESOLVES.get(name, set()))
        missing = sorted(str(f.relative_to(ROOT)) for f in runs
                         if not any(f == dep or dep in f.parents for dep in code))
        assert not missing, f"{name}@{key} runs {missing} but does not depend on it in dvc.yaml"


def test_the_library_has_no_import_cycle():
    """config <- tracking <- registry once imported each other; none may again, even inside functions."""
    graph = {file: {_module_file(m) for m in _imports(file)} - {file}
             for file in (ROOT / "pipeline").rglob("*.py")}
    state: dict[Path, str] = {}

    def visit(file: Path, trail: list[Path]) -> None:
        state[file] = "open"
        for module in sorted(graph.get(file, ())):
            if module.name == "__init__.py" and file.parent == module.parent:
                continue  # a package's own modules under its __init__ are not a cycle of imports
            if state.get(module) == "open":
                cycle = [str(f.relative_to(ROOT)) for f in [*trail[trail.index(module):], module]]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if module not in state:
                visit(module, [*trail, module])
        state[file] = "done"

    for file in sorted(graph):
        if file not in state:
            visit(file, [file])


def test_the_delivered_models_are_the_dvc_artifacts(monkeypatch):
    """dvc.yaml's `artifacts` section is what compose writes for the committed params.yaml: one
    per delivered model, at the path its metadata stage writes, with the verdict of the model in
    the workspace ("not built" in a fresh clone), as DVC reads it."""
    from dvc.repo import Repo

    from pipeline import repro

    monkeypatch.chdir(ROOT)
    cfg = config.load(ROOT / "params.yaml")
    text = (ROOT / "dvc.yaml").read_text()
    verdicts = {v.build: v.verdict for v in repro.build_verdicts(cfg)}
    assert layout.with_dvc_artifacts(text, cfg, verdicts) == text, "run `litert-pipeline compose` and commit dvc.yaml"
    with Repo(str(ROOT)) as repo:
        declared = repo.artifacts.read()["dvc.yaml"]
    delivered = {f"{b.model}-{b.variant}": layout.BuildPaths.of(b.model, b.variant).delivered.as_posix()
                 for b in cfg.build.values()}
    delivered |= {f"{m}-auto": layout.BuildPaths.of(m, "auto").delivered.as_posix() for m in cfg.autoselect}
    assert {name: artifact.path for name, artifact in declared.items()} == delivered
    float_digits = declared["digits-float"]
    assert float_digits.type == "model" and float_digits.meta["variant"] == "float" and "vision" in float_digits.labels
