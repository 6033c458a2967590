"""dvc.yaml against the code: every path a stage declares is one the layout module gives it, and
every stage depends on all the library code it runs (so a code change reruns what it affects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config, fingerprint, layout
from pipeline.config import TRUSTED_FUNCTIONS, TRUSTED_MODULES
from tests.conftest import ROOT

CODE = ("stages", "pipeline", layout.CODE_FINGERPRINTS.as_posix())


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


def test_every_stage_depends_on_the_library_code_it_runs(stages):
    """Each stage's one code dependency is its module's fingerprint, which the `code` stage
    writes from the folders it depends on; the fingerprint covers the stage's import closure
    and the modules a config may name (test_e2e checks it against the modules a run imports)."""
    named = {reference.partition(":")[0] for reference in TRUSTED_FUNCTIONS} | TRUSTED_MODULES
    assert set().union(*fingerprint.NAMED_BY_CONFIG.values()) == named
    for name, key, deps, _, module in stages:
        code = {dep for dep in deps if dep.startswith(CODE)}
        if name == "code":
            assert code == {"pipeline", "stages"}, f"{name}: the code stage hashes the folders"
            continue
        stage_module = module.removeprefix("stages.")
        assert code == {layout.code_fingerprint(stage_module).as_posix()}, f"{name}@{key}: code deps {sorted(code)}"
        runs = fingerprint.stage_code(stage_module, ROOT)
        assert ROOT / "stages" / f"{stage_module}.py" in runs
        assert {fingerprint.module_file(m, ROOT) for m in fingerprint.NAMED_BY_CONFIG.get(stage_module, ())} <= set(runs)


def test_a_fingerprint_changes_with_the_code_its_stage_runs_alone(tmp_path):
    """The `code` stage's files: an edit of a module changes the fingerprints of the stages
    that run it, and no other."""
    import json
    import shutil

    for package in fingerprint.PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {path.name: json.loads(path.read_text()) for path in fingerprint.write_fingerprints(tmp_path)}
    assert set(before) == {f"{module}.json" for module in fingerprint.stage_modules(ROOT)}
    assert "pipeline/report.py" in before["report.json"] and "pipeline/report.py" not in before["quantize.json"]
    with (tmp_path / "pipeline" / "report.py").open("a") as module:
        module.write("\n# edited\n")
    after = {path.name: json.loads(path.read_text()) for path in fingerprint.write_fingerprints(tmp_path)}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {name for name, files in before.items() if "pipeline/report.py" in files}
    assert "report.json" in changed and "quantize.json" not in changed


def test_the_library_has_no_import_cycle():
    """config <- tracking <- registry once imported each other; none may again, even inside functions."""
    graph = {file: {fingerprint.module_file(m, ROOT) for m in fingerprint.imports(file, ROOT)} - {file}
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
