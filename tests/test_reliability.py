"""Outputs are written atomically (through pipeline.io) and every exit code is documented.

The end-to-end SIGKILL test is in test_determinism.py (it shares that module's two runs).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from pipeline import errors
from tests.conftest import ROOT

# Calls that create or change a file's content, by function or method name.
WRITING_FUNCTIONS = {"write_text", "write_bytes", "save", "savez", "savez_compressed", "copy", "copy2", "copyfile",
                     "copytree", "move", "dump"}
# Blocks whose writes are fine: pipeline.io's staging, and folders deleted after use.
SAFE_BLOCKS = {"atomic_path", "TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile"}
# Writes reviewed as safe outside such blocks, by file or file:function, and why.
REVIEWED = {
    "pipeline/examples.py": "every builder writes into the folder build_example stages with atomic_path",
    "pipeline/sweep.py:run_stages": "a progress log, meant to be read while it grows",
    "pipeline/tracking.py:set_aside": "moves a queued record within .litert/: a rename, whole or not at all",
    "pipeline/parallel.py:make": "a throwaway worker copy under .litert/workers/, removed after the run",
    "pipeline/parallel.py:submit": "a worker's DVC log, meant to be read while it grows",
    "pipeline/parallel.py:run_worker": "a worker's DVC log (a Ray task's), meant to be read while it grows",
    "pipeline/parallel.py:collect_records": "moves a worker's finished records within .litert/: a rename, whole or "
                                            "not at all",
    "pipeline/parallel.py:_write_lock": "yaml.dump returns the text write_text writes atomically",
}


def _writes(tree: ast.AST, io_names: set[str]):
    """(function, line, call) of each file-writing call not inside a safe block."""

    def visit(node: ast.AST, function: str, safe: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, (ast.With, ast.AsyncWith)):
            items_safe = safe
            for item in node.items:  # `with atomic_path(p) as tmp, open(tmp, "wb")`: the open is staged
                yield from visit(item.context_expr, function, items_safe)
                items_safe = items_safe or _call_name(item.context_expr) in SAFE_BLOCKS
            for child in node.body:
                yield from visit(child, function, items_safe)
            return
        if isinstance(node, ast.Call) and not safe and _is_write(node, io_names):
            yield function, node.lineno, ast.unparse(node)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, function, safe)

    yield from visit(tree, "<module>", False)


def _call_name(node: ast.AST) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)


def _is_write(call: ast.Call, io_names: set[str]) -> bool:
    name = _call_name(call)
    receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
    if isinstance(receiver, ast.Name) and receiver.id in io_names:
        return False  # pipeline.io's own helpers
    if name == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
    return name in WRITING_FUNCTIONS and isinstance(call.func, ast.Attribute)


def _io_aliases(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            names |= {alias.asname or alias.name for alias in node.names if alias.name == "io"}
    return names


def test_every_output_is_written_through_pipeline_io():
    stragglers = []
    for file in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]):
        relative = file.relative_to(ROOT).as_posix()
        if relative == "pipeline/io.py":
            continue
        tree = ast.parse(file.read_text())
        for function, line, call in _writes(tree, _io_aliases(tree)):
            if relative not in REVIEWED and f"{relative}:{function}" not in REVIEWED:
                stragglers.append(f"{relative}:{line} in {function}: {call}")
    assert not stragglers, "write through pipeline.io (write_bytes/write_text/write_json/atomic_path):\n" + \
        "\n".join(stragglers)


def test_a_writer_killed_mid_write_leaves_the_previous_output(tmp_path):
    target = tmp_path / "model.tflite"
    target.write_bytes(b"the previous model")
    script = (
        "import sys, time\n"
        "from pipeline.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as staged, open(staged, 'wb') as out:\n"
        "    out.write(b'half of the new mod'); out.flush()\n"
        "    print('writing', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert process.stdout.readline() == b"writing\n"
    finally:
        process.kill()  # SIGKILL: no cleanup code runs
        process.wait()
        process.stdout.close()
    assert target.read_bytes() == b"the previous model"


def _error_classes(cls: type) -> list[type]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _error_classes(child))]


def test_every_exit_code_is_in_the_readme_table():
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", (ROOT / "README.md").read_text(), re.MULTILINE)}
    codes = {errors.EXIT_OK} | {cls.exit_code for cls in _error_classes(errors.PipelineError)}
    assert codes <= documented, f"exit codes missing from README.md: {sorted(codes - documented)}"
