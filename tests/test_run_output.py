"""What `litert-pipeline run` shows: the stages' output without native libraries' log lines, and
a closing summary whose verdicts belong to the delivered bytes."""

from __future__ import annotations


def test_native_log_lines_are_dropped_and_progress_bars_pass_at_once():
    import io
    import os
    import threading

    from pipeline.repro import _forward_without_native_logs

    read_end, write_end = os.pipe()
    out = io.BytesIO()
    forwarder = threading.Thread(target=_forward_without_native_logs, args=(read_end, out))
    forwarder.start()
    for chunk in (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
                  b"I0000 00:00:1796146777.607624   16427 port.cc:153] oneDNN custom opera",
                  b"tions are on.\nRunning stage 'convert@digits':\n",
                  b"E0000 00:00:1796146785.892219   16427 cuda_platform.cc:52] failed call to cuInit\n",
                  b"INFO: [gpu_registry.cc:130] Attempting to load GPU accelerator(libLiteRtGpuAccelerator.so).\n",
                  "WARNING: [compiler_plugin.cc:312] Failed to load plugin: ERROR: [plugin.cc:259]\n".encode(),
                  "\u2514 Could not load shared library libLiteRtCompilerPlugin_IntelOpenvino.so\n".encode(),
                  b"calibrate:  50%\r", b"calibrate: 100%\r\n", b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
                  b"error: params.yaml: model.digits: the last line, without a newline"):
        os.write(write_end, chunk)
    os.close(write_end)
    forwarder.join(timeout=10)
    assert out.getvalue() == (b"Running stage 'convert@digits':\ncalibrate:  50%\rcalibrate: 100%\r\n"
                              b"error: params.yaml: model.digits: the last line, without a newline")


def test_the_summary_gives_verdicts_only_for_the_bytes_they_were_made_on(tmp_path, monkeypatch):
    """A run whose metadata stage failed leaves an earlier run's validation report behind: its
    verdict must not be shown as this run's."""
    import hashlib
    import json

    from pipeline import config, layout, repro
    from tests.conftest import ROOT

    cfg = config.load(ROOT / "params.yaml")
    monkeypatch.chdir(tmp_path)
    builds = [(b.model, b.variant) for b in cfg.build.values()]
    (passed, stale, missing, *_rest) = builds
    for model, variant in (passed, stale, missing):
        paths = layout.BuildPaths.of(model, variant)
        paths.validation_json.parent.mkdir(parents=True, exist_ok=True)
        paths.delivered.parent.mkdir(parents=True, exist_ok=True)
        delivered = f"{variant} bytes".encode()
        if (model, variant) != missing:
            paths.delivered.write_bytes(delivered)
        digest = hashlib.sha256(delivered if (model, variant) == passed else b"earlier run").hexdigest()
        paths.validation_json.write_text(json.dumps({"passed": True, "model_sha256": digest}))
    lines = {line.split()[0]: line for line in repro.summary(cfg, repro.build_verdicts(cfg)).splitlines()[1:] if line.startswith("  ")}
    assert " passed " in lines["-".join(passed)]
    assert "not validated" in lines["-".join(stale)]
    assert "not built" in lines["-".join(missing)]
    assert repro.summary(cfg, repro.build_verdicts(cfg)).splitlines()[0] == f"builds: 1 of {len(builds) + len(cfg.autoselect)} passed"
    # After a failed run: a stage it depends on (`dvc status` names that one only) is out of
    # date, so the passing report and the model are an earlier run's.
    name = "-".join(passed)
    graph = {f"validate@{name}": {f"metadata@{name}"}, f"metadata@{name}": {f"convert@{passed[0]}"}}
    verdicts = repro.build_verdicts(cfg, {f"convert@{passed[0]}"}, graph)
    lines = {line.split()[0]: line for line in repro.summary(cfg, verdicts).splitlines()[1:] if line.startswith("  ")}
    assert "out of date" in lines[name] and "not validated" in lines["-".join(stale)]
    assert repro.summary(cfg, verdicts).splitlines()[0].startswith("builds: 0 of ")
    # A build removed from the config leaves its model: named as such, not as a build.
    layout.BuildPaths.of(passed[0], "gone").delivered.write_bytes(b"old")
    last_row = [line for line in repro.summary(cfg, verdicts).splitlines() if line.startswith("  ")][-1]
    assert last_row == (f"  left from builds no longer configured (nothing builds or validates them): "
                        f"models/{passed[0]}/gone.tflite")
