"""The comparison report: rows from validation reports, the Pareto front, Markdown/CSV/PNG/JSON."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from pipeline import report
from pipeline.errors import InputError
from pipeline.io import write_json
from tests.conftest import ROOT, run_cli


def _validation(size: int, drop: float | None, latency: float, *, failures=(), cosine=0.99) -> dict:
    """A validation report as the validate stage writes it (only the fields the report reads)."""
    metrics = {"size_bytes": size, "size_ratio": size / 30000, "cosine": cosine, "snr_db": 30.0,
               "latency_median_ms": latency, "latency_p90_ms": latency * 1.5}
    if drop is not None:
        metrics.update(accuracy=0.98 - drop, source_accuracy=0.98, accuracy_drop=drop)
    gates = [{"gate": "max_accuracy_drop", "passed": not failures}, {"gate": "min_cosine", "passed": True}]
    return {"metrics": metrics, "gates": gates, "passed": not failures, "failures": list(failures)}


# variant: (size, accuracy drop, latency). static beats dynamic on every axis; wi4 is the
# smallest (size front) but slower and worse than static (not on the latency front).
VARIANTS = {
    "float": (30000, 0.0, 0.30),
    "dynamic_wi8_afp32": (9000, 0.004, 0.50),
    "static_wi8_ai8": (8000, 0.002, 0.10),
    "weight_only_wi4_afp32": (5000, 0.05, 0.60),
}


@pytest.mark.parametrize("points, front", [
    ([(1, 5), (2, 3), (3, 4), (4, 1)], [True, True, False, True]),
    ([(1, 1), (1, 1)], [True, True]),  # equal points do not beat each other
    ([(2, 2), None, (1, 3)], [True, False, True]),
    ([], []),
])
def test_pareto_front(points, front):
    assert report.pareto_front(points) == front


def _model_report():
    rows = [report.row_from_validation("digits", v, _validation(*values)) for v, values in VARIANTS.items()]
    return report.build_model_report("digits", rows)


def test_rows_are_sorted_by_size_with_both_fronts_marked():
    model = _model_report()
    assert [r.variant for r in model.rows] == ["weight_only_wi4_afp32", "static_wi8_ai8", "dynamic_wi8_afp32", "float"]
    assert {r.variant for r in model.rows if r.pareto_size} == {"weight_only_wi4_afp32", "static_wi8_ai8", "float"}
    assert {r.variant for r in model.rows if r.pareto_latency} == {"static_wi8_ai8", "float"}
    assert model.quality_metric == "accuracy_drop" and model.quality_value(model.rows[0]) == pytest.approx(5.0)


def test_models_without_labels_compare_on_cosine():
    rows = [report.row_from_validation("m", "a", _validation(100, None, 1.0, cosine=0.9)),
            report.row_from_validation("m", "b", _validation(200, None, 1.0, cosine=0.99))]
    model = report.build_model_report("m", rows)
    assert model.quality_metric == "cosine_loss"
    assert [round(model.quality_value(r), 6) for r in model.rows] == [0.1, 0.01]
    assert all(r.pareto_size for r in model.rows)


def test_csv_and_markdown_carry_every_variant_and_its_gates():
    rows = [report.row_from_validation("digits", v, _validation(*values)) for v, values in VARIANTS.items()]
    rows.append(report.row_from_validation("digits", "bad", _validation(7000, 0.2, 0.2, failures=["accuracy_drop 0.2 > 0.02"])))
    model = report.build_model_report("digits", rows)
    table = list(csv.DictReader(io.StringIO(report.to_csv(model))))
    assert [r["variant"] for r in table] == ["weight_only_wi4_afp32", "bad", "static_wi8_ai8", "dynamic_wi8_afp32", "float"]
    bad = table[1]
    assert bad["passed"] == "False" and bad["gates_passed"] == "1" and bad["gates_total"] == "2"
    assert float(table[2]["accuracy_drop"]) == 0.002 and table[2]["pareto_size"] == "True"
    text = report.to_markdown(model)
    assert "| static_wi8_ai8 | 8000 |" in text and "1/2 **FAIL**" in text and "accuracy_drop 0.2 > 0.02" in text
    assert "![accuracy drop (pt) vs. size and latency](pareto.png)" in text


def test_trail_lists_every_attempt_and_the_layers_kept_in_float():
    trail = {
        "budget": {"max_accuracy_drop": 0.005, "max_size_ratio": None, "max_latency_ms": None, "max_steps": 3,
                   "layers_per_step": 1},
        "attempts": [
            {"variant": "static_wi8_ai8", "float_tensors": [], "size_bytes": 8000, "size_ratio": 0.27,
             "accuracy_drop": 0.3, "cosine": 0.5, "latency_median_ms": 0.1, "passed": False,
             "failures": ["accuracy_drop 0.3 > max_accuracy_drop 0.005"]},
            {"variant": "static_wi8_ai8+2 float", "float_tensors": ["dense/MatMul", "dense_1/Relu"], "size_bytes": 9000,
             "size_ratio": 0.3, "accuracy_drop": 0.0, "cosine": 0.999, "latency_median_ms": 0.1, "passed": True,
             "failures": []},
        ],
    }
    trail["selected"] = trail["attempts"][1]
    model = report.build_model_report("digits", [report.row_from_validation("digits", "auto", _validation(9000, 0.0, 0.1))],
                                      trail)
    text = report.to_markdown(model)
    assert "## Auto-selection" in text and "accuracy drop ≤ 0.5 pt" in text
    assert "| 1 | static_wi8_ai8 | 0 | 8000 |" in text and "missed: accuracy_drop 0.3" in text
    assert "**Selected: `static_wi8_ai8+2 float`**" in text and "- `dense_1/Relu`" in text


def test_write_reads_validation_files_and_writes_all_outputs(tmp_path):
    reports_dir = tmp_path / "reports"
    for variant, values in VARIANTS.items():
        write_json(reports_dir / "digits" / variant / "validation.json", _validation(*values))
    models = report.collect(reports_dir, {"digits": [*VARIANTS, "not_built"]})
    written = report.write(models, tmp_path / "comparison")
    folder = tmp_path / "comparison" / "digits"
    assert written == [folder / "report.md", folder / "report.csv", folder / "pareto.png", folder / "pareto.json",
                       folder / "report.json"]
    rows = report.rows_from_json("digits", json.loads((folder / "report.json").read_text()))
    by_variant = lambda r: r.variant
    assert sorted(rows, key=by_variant) == sorted(models[0].rows, key=by_variant)  # what DVC experiments carry back
    with Image.open(folder / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 800 and len(image.getcolors(1 << 16) or []) > 8
    data = json.loads((folder / "pareto.json").read_text())
    assert {d["variant"] for d in data} == set(VARIANTS)
    assert {d["variant"] for d in data if d["front_size"] == "Pareto front"} == {"weight_only_wi4_afp32", "static_wi8_ai8", "float"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_malformed_validation_report_names_the_file(tmp_path):
    bad = tmp_path / "reports" / "digits" / "float" / "validation.json"
    write_json(bad, {"metrics": {}})
    with pytest.raises(InputError, match=str(bad)):
        report.collect(tmp_path / "reports", {"digits": ["float"]})
    bad.write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON"):
        report.collect(tmp_path / "reports", {"digits": ["float"]})


def test_cli_report_writes_the_comparison_without_tensorflow(tmp_path):
    for variant, values in VARIANTS.items():
        write_json(tmp_path / "reports" / "digits" / variant / "validation.json", _validation(*values))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_cli("litert-pipeline", "report", "--model", "digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "comparison" / "digits" / "pareto.png").is_file()
    assert "| static_wi8_ai8 |" in (tmp_path / "comparison" / "digits" / "report.md").read_text()
    missing = run_cli("litert-pipeline", "report", "--model", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "unknown model 'nope'" in missing.stderr
    code = "import sys, pipeline.report, pipeline.cli; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _int8_rows(ours_snr: float, ours_drop: float, converter_snr: float, converter_drop: float) -> list:
    ours = _validation(8000, ours_drop, 0.1)
    ours["metrics"]["snr_db"] = ours_snr
    ours["layer_errors"] = {"worst": [{"tensor": "dense/gelu", "snr_db": 9.5}, {"tensor": "logits", "snr_db": 12.0}]}
    converter = _validation(8100, converter_drop, 0.1)
    converter["metrics"]["snr_db"] = converter_snr
    return [report.row_from_validation("m", "static_wi8_ai8", ours),
            report.row_from_validation("m", "converter_int8", converter)]


def test_the_default_int8_is_judged_against_the_converters_metric_by_metric():
    worse = report.to_markdown(report.build_model_report("m", _int8_rows(20.0, 0.01, 39.2, 0.002)))
    assert "## Default int8 (`static_wi8_ai8`, LiteRT Quantizer) vs. the converter's (`converter_int8`)" in worse
    assert "**`static_wi8_ai8` is worse than the converter's int8**: SNR (dB) 20 vs. 39.2; accuracy drop (pt) 1 vs. 0.2" in worse
    assert "`dense/gelu` 9.5 dB" in worse  # where the error enters, measured
    better = report.to_markdown(report.build_model_report("m", _int8_rows(40.0, 0.0, 39.2, 0.002)))
    assert "`static_wi8_ai8` is at least as good as the converter's int8 on every measured metric." in better
    # Without a converter int8 build there is nothing to compare.
    alone = report.build_model_report("m", _int8_rows(40.0, 0.0, 39.2, 0.002)[:1])
    assert "Default int8" not in report.to_markdown(alone)


SENSITIVITY = {"variant": "static_wi8_ai8", "metric": "accuracy_drop", "num_samples": 100, "layers_not_measured": 2,
               "layers": [{"tensor": "dense_1/Relu", "op": "FULLY_CONNECTED", "drop": 0.2, "snr_db_alone": 3.1,
                           "snr_db_in_model": 2.0},
                          {"tensor": "logits", "op": "FULLY_CONNECTED", "drop": 0.0, "snr_db_alone": 30.5,
                           "snr_db_in_model": 25.0}]}


def test_sensitivity_is_a_table_in_the_trail_and_a_plot(tmp_path):
    lines = report.sensitivity_markdown([SENSITIVITY, {"variant": "x", "reason": "not a static integer model"}])
    text = "\n".join(lines)
    assert "### Layer sensitivity of `static_wi8_ai8`" in text and "2 more not measured" in text
    assert "| 1 | `dense_1/Relu` | FULLY_CONNECTED | 20 | 3.1 | 2 |" in text
    assert "### Layer sensitivity of `x`" in text and "Not measured: not a static integer model." in text
    for analyses, name in (([SENSITIVITY], "bars.png"), ([], "none.png")):
        path = report.plot_sensitivity(analyses, tmp_path / name, model="m")
        with Image.open(path) as image:
            assert image.format == "PNG" and len(image.getcolors(1 << 16) or []) > 4
