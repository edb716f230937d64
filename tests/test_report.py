"""`saealign report`: the table, the deltas and the plots from result files."""

from __future__ import annotations

import json

import pytest

from saealign._io import write_json
from saealign.eval import metric, result_record, select_subset
from saealign.eval.report import deltas, load_results, markdown_table, write_report


def _mt(method, score, se):
    metrics = {"score": metric(score, se), "turn1": metric(score + 0.5, se), "turn2": metric(score - 0.5, se),
               "category/writing": metric(score + 1, 0.4), "category/math": metric(score - 1, 0.4),
               "category/math/turn1": metric(score - 1, 0.5)}
    return result_record("mt-bench", method, metrics, ["score", "turn1", "turn2"], {"seeds": [0]})


def _ae(method, wr, lc):
    return result_record("alpaca-eval", method, {"win_rate": metric(wr, 1.5), "lc_win_rate": metric(lc, 2.0)},
                         ["win_rate", "lc_win_rate"], {})


def _mc(method, acc):
    return result_record("mmlu", method, {"acc": metric(acc, 0.01)}, ["acc"], {})


@pytest.fixture
def runs(tmp_path):
    files = {"base/mt/results.json": _mt("base", 5.0, 0.2), "base/ae/results.json": _ae("base", 10.0, 12.0),
             "base/mmlu_results.json": _mc("base", 0.30), "dspa/mt/results.json": _mt("dspa", 5.6, 0.3),
             "dspa/ae/results.json": _ae("dspa", 14.0, 13.0), "dspa/mmlu_results.json": _mc("dspa", 0.29)}
    for name, payload in files.items():
        write_json(tmp_path / name, payload)
    (tmp_path / "base" / "mt" / "config.json").write_text("{}")  # not a result: skipped
    return [tmp_path / "base", tmp_path / "dspa"]


def test_table_has_methods_by_benchmarks_with_intervals(runs):
    results = load_results(runs)
    assert len(results) == 6
    table = markdown_table(results).splitlines()
    # columns in the order the files are found (sorted paths)
    assert table[0] == ("| method | alpaca-eval win_rate | alpaca-eval lc_win_rate | mmlu acc | mt-bench score | "
                        "mt-bench turn1 | mt-bench turn2 |")
    assert table[2] == "| base | 10.00 ± 2.94 | 12.00 ± 3.92 | 0.30 ± 0.02 | 5.00 ± 0.39 | 5.50 ± 0.39 | 4.50 ± 0.39 |"
    assert table[3].startswith("| dspa | 14.00 ± 2.94 |")


def test_deltas_against_the_baseline(runs):
    table = deltas(load_results(runs), "base")
    d, se = table["dspa"]["alpaca-eval win_rate"]
    assert d == pytest.approx(4.0) and se == pytest.approx((1.5 ** 2 + 1.5 ** 2) ** 0.5)
    assert table["dspa"]["mmlu acc"][0] == pytest.approx(-0.01) and "base" not in table


def test_report_files_and_cli(runs, tmp_path):
    path = write_report(runs, tmp_path / "out", baseline="base")
    text = path.read_text()
    assert "| dspa | alpaca-eval win_rate | 4.00 ± 4.16 |" in text
    for png in ("mt_bench_categories.png", "deltas.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000 and f"]({png})" in text
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report(runs, tmp_path / "out2", baseline="nope")

    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import eval_gen_cmd  # noqa: F401

    out = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "cli"), "--baseline", "dspa"])
    assert out.exit_code == 0, out.output
    assert "Baseline for deltas: `dspa`" in (tmp_path / "cli" / "report.md").read_text()


def test_bad_inputs(tmp_path):
    (tmp_path / "results.json").write_text("{oops")
    with pytest.raises(ValueError, match="results.json: invalid JSON"):
        load_results([tmp_path])
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match="no saealign result files"):
        load_results([tmp_path])
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "missing"])
    with pytest.raises(ValueError, match="headline"):
        result_record("x", "m", {"a": metric(1)}, ["b"], {})


def test_select_subset_is_seeded_and_ordered():
    items = list(range(100))
    a = select_subset(items, 10, seed=3)
    assert a == select_subset(items, 10, seed=3) and a == sorted(a) and a != select_subset(items, 10, seed=4)
    assert select_subset(items, None) == items and select_subset(items, 500) == items


def test_files_of_one_method_and_benchmark_merge(tmp_path):
    """MC tasks run in two invocations under one method name: both tasks reach the table."""
    write_json(tmp_path / "a.results.json", result_record("mc", "base", {"arc/acc": metric(0.5, 0.01)}, ["arc/acc"], {}))
    write_json(tmp_path / "b.results.json", result_record("mc", "base", {"mmlu/acc": metric(0.3, 0.01)}, ["mmlu/acc"], {}))
    table = markdown_table(load_results([tmp_path])).splitlines()
    assert table[0] == "| method | mc arc/acc | mc mmlu/acc |"
    assert table[2] == "| base | 0.50 ± 0.02 | 0.30 ± 0.02 |"


def test_deltas_use_paired_differences_and_merged_headlines(tmp_path):
    base = [result_record("mc", "base", {f"{t}/acc": metric(0.5, 0.02)}, [f"{t}/acc"], {}) for t in ("arc", "mmlu")]
    steered = [result_record("mc", "dspa", {f"{t}/acc": metric(0.51, 0.02)}, [f"{t}/acc"], {},
                             paired_vs_baseline={"delta": {f"{t}/acc": {"value": 0.01, "se": 0.001}}})
               for t in ("arc", "mmlu")]
    for i, r in enumerate(base + steered):
        write_json(tmp_path / f"{i}.results.json", r)
    table = deltas(load_results([tmp_path]), "base")["dspa"]
    assert set(table) == {"mc arc/acc", "mc mmlu/acc"}  # the second file's headline is not lost
    d, se = table["mc mmlu/acc"]
    assert d == pytest.approx(0.01) and se == pytest.approx(0.001)  # paired, not hypot(0.02, 0.02)
