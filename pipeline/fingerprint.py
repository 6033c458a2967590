"""The code each stage runs, as one small file per stage module that its DVC stages depend on.

Every stage used to list each library module it runs as a DVC dependency: about 20 per stage,
so at 50 models DVC checked 13,204 code dependencies and parsed them out of a 3.4 MB dvc.lock
in every `dvc status` (10.3 s against 18.2 s now, side by side: bench/noop_built.md). Now the `code` stage
depends on the folders `pipeline/` and `stages/` and writes, for each stage module, the
SHA-256 of every project file that module imports (at module level or inside functions,
directly or through other modules, and the modules a config may name). A code edit reruns
the `code` stage alone; only the stages whose modules' files changed then run.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from pipeline.io import sha256_path, write_text
from pipeline.layout import CODE_FINGERPRINTS, code_fingerprint

PACKAGES = ("pipeline", "stages")
# Modules a stage imports by name from its config (factories, task metrics: config.TRUSTED_*),
# which no import statement shows.
NAMED_BY_CONFIG = {"convert": {"pipeline.examples"}, "quantize": {"pipeline.examples"},
                   "validate": {"pipeline.task_metrics"},
                   "autoselect": {"pipeline.examples", "pipeline.task_metrics"}}


def stage_modules(root: Path = Path(".")) -> list[str]:
    """The stage modules (`stages/<name>.py`, run as `python -m stages.<name>`)."""
    return sorted(path.stem for path in (root / "stages").glob("*.py") if path.stem not in ("__init__", "code"))


def module_file(module: str, root: Path = Path(".")) -> Path | None:
    path = root / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imports(file: Path, root: Path = Path(".")) -> frozenset[str]:
    """Every project module `file` imports, at module level or inside functions (not for typing)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(block)}
    package = file.relative_to(root).with_suffix("").parts[:-1]
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
        if parts[0] in PACKAGES:
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                           if module_file(".".join(parts[:i]), root))
    return frozenset(modules)


def stage_code(stage: str, root: Path = Path(".")) -> list[Path]:
    """The project files `python -m stages.<stage>` runs: its import closure (with the packages
    that hold each module: importing a module runs their `__init__`)."""
    seen: set[Path] = set()
    todo = [module_file(".".join(parts[:i]), root) for module in (f"stages.{stage}", *NAMED_BY_CONFIG.get(stage, ()))
            for parts in [module.split(".")] for i in range(1, len(parts) + 1)]
    while todo:
        file = todo.pop()
        if file is None or file in seen:
            continue
        seen.add(file)
        todo.extend(module_file(module, root) for module in imports(file, root))
    return sorted(seen)


def write_fingerprints(root: Path = Path(".")) -> list[Path]:
    """The `code` stage: for each stage module, {file: SHA-256} of the code it runs."""
    import shutil

    shutil.rmtree(root / CODE_FINGERPRINTS, ignore_errors=True)  # a removed stage's file goes with it
    written = []
    for stage in stage_modules(root):
        digests = {file.relative_to(root).as_posix(): sha256_path(file) for file in stage_code(stage, root)}
        written.append(write_text(root / code_fingerprint(stage), json.dumps(digests, indent=1) + "\n"))
    return written
