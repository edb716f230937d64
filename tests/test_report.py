"""`saealign report`: the table, the deltas and the plots from result files."""

from __future__ import annotations

import json

import pytest

from saealign.data import select_subset
from saealign.eval.report import deltas, load_results, markdown_table, write_report
from saealign.results import ResultRecord, read_results, write_results
from saealign.stats import Estimate


def metric(value, se):
    """An estimate whose interval is value +- 2 se (what the report shows is the interval it is given)."""
    return Estimate(value, (value - 2 * se, value + 2 * se), se, 100)


def result_record(benchmark, method, metrics, headline, config, **fields):
    return ResultRecord(benchmark, method, metrics, headline, config, **fields)


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
    for name, record in files.items():
        write_results(tmp_path / name, [record])
    (tmp_path / "base" / "mt" / "config.json").write_text("{}")  # not a result: skipped
    return [tmp_path / "base", tmp_path / "dspa"]


def test_table_has_methods_by_benchmarks_with_intervals(runs):
    results = load_results(runs)
    assert len(results) == 6
    table = markdown_table(results).splitlines()
    # columns in the order the files are found (sorted paths)
    assert table[0] == ("| method | alpaca-eval win_rate | alpaca-eval lc_win_rate | mmlu acc | mt-bench score | "
                        "mt-bench turn1 | mt-bench turn2 |")
    assert table[2] == ("| base | 10.00 [7.00, 13.00] | 12.00 [8.00, 16.00] | 0.30 [0.28, 0.32] | 5.00 [4.60, 5.40] | "
                        "5.50 [5.10, 5.90] | 4.50 [4.10, 4.90] |")
    assert table[3].startswith("| dspa | 14.00 [11.00, 17.00] |")


def test_deltas_against_the_baseline(runs):
    table = deltas(load_results(runs), "base")
    d = table["dspa"]["alpaca-eval win_rate"]
    assert d.value == pytest.approx(4.0) and d.se == pytest.approx((1.5 ** 2 + 1.5 ** 2) ** 0.5)
    assert d.ci95 is None  # different units: no interval
    assert table["dspa"]["mmlu acc"].value == pytest.approx(-0.01) and "base" not in table


def test_report_files_and_cli(runs, tmp_path):
    path = write_report(runs, tmp_path / "out", baseline="base")
    text = path.read_text()
    assert "| dspa | alpaca-eval win_rate | 4.00 (SE 2.12) |" in text
    for png in ("mt_bench_categories.png", "deltas.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000 and f"]({png})" in text
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report(runs, tmp_path / "out2", baseline="nope")

    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import eval_gen_cmd  # noqa: F401

    out = CliRunner().invoke(app, ["report", *map(str, runs), "--output", str(tmp_path / "cli"), "--baseline", "dspa"])
    assert out.exit_code == 0, out.output
    assert "Baseline for deltas: `dspa`" in (tmp_path / "cli" / "report.md").read_text()


def test_bad_inputs(tmp_path):
    (tmp_path / "results.json").write_text("{oops")
    with pytest.raises(ValueError, match="results.json: invalid JSON"):
        load_results([tmp_path])
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match="no saealign result files"):
        load_results([tmp_path])
    with pytest.raises(ValueError, match="not a saealign result file"):
        load_results([tmp_path / "results.json"])  # named explicitly: refused, not skipped
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "missing"])
    with pytest.raises(ValueError, match="headline"):
        result_record("x", "m", {"a": metric(1, 0.1)}, ["b"], {})
    with pytest.raises(ValueError, match="baseline"):
        result_record("x", "m", {"a": metric(1, 0.1)}, ["a"], {}, deltas={"a": metric(0, 0.1)})


def test_select_subset_is_seeded_and_ordered():
    items = list(range(100))
    a = select_subset(items, 10, seed=3)
    assert a == select_subset(items, 10, seed=3) and a == sorted(a) and a != select_subset(items, 10, seed=4)
    assert select_subset(items, None) == items and select_subset(items, 500) == items


def test_files_of_one_method_and_benchmark_merge(tmp_path):
    """MC tasks run in two invocations under one method name: both tasks reach the table."""
    write_results(tmp_path / "a.results.json", [result_record("mc", "base", {"arc/acc": metric(0.5, 0.01)}, ["arc/acc"], {})])
    write_results(tmp_path / "b.results.json", [result_record("mc", "base", {"mmlu/acc": metric(0.3, 0.01)}, ["mmlu/acc"], {})])
    table = markdown_table(load_results([tmp_path])).splitlines()
    assert table[0] == "| method | mc arc/acc | mc mmlu/acc |"
    assert table[2] == "| base | 0.50 [0.48, 0.52] | 0.30 [0.28, 0.32] |"


def test_deltas_use_paired_differences_and_merged_headlines(tmp_path):
    base = [result_record("mc", "base", {f"{t}/acc": metric(0.5, 0.02)}, [f"{t}/acc"], {}) for t in ("arc", "mmlu")]
    steered = [result_record("mc", "dspa", {f"{t}/acc": metric(0.51, 0.02)}, [f"{t}/acc"], {},
                             baseline="base", deltas={f"{t}/acc": metric(0.01, 0.001)})
               for t in ("arc", "mmlu")]
    for i, r in enumerate(base + steered):
        write_results(tmp_path / f"{i}.results.json", [r])
    table = deltas(load_results([tmp_path]), "base")["dspa"]
    assert set(table) == {"mc arc/acc", "mc mmlu/acc"}  # the second file's headline is not lost
    d = table["mc mmlu/acc"]
    assert d.value == pytest.approx(0.01) and d.se == pytest.approx(0.001)  # paired, not hypot(0.02, 0.02)
    assert d.ci95 == pytest.approx((0.008, 0.012))


def test_record_json_round_trip(tmp_path):
    record = result_record("pref:validation", "dspa", {"reward_acc": metric(0.6, 0.02), "words": Estimate(12.5)},
                           ["reward_acc"], {"n_boot": 2000}, data={"n": 100, "role": "validation"}, baseline="base",
                           deltas={"reward_acc": metric(0.1, 0.01)}, details={"judge": None})
    path = write_results(tmp_path / "results.json", [record, record])
    assert read_results(path) == [record, record]
    assert json.loads(path.read_text())["records"][0]["metrics"]["words"] == {"value": 12.5, "ci95": None, "se": None,
                                                                           "n": None}


def test_alignment_cost_from_artifacts_shown_beside_quality(tmp_path):
    """`recorded_cost` reads what a map, a RepE vector or a trained model recorded; the report shows it per method."""
    from saealign._io import write_json
    from saealign.steering import recorded_cost

    cost = {"stage": "dspa fit", "flops": {"forward": 3e12, "backward": 0.0, "total": 3e12}, "wall_seconds": 42.4}
    write_json(tmp_path / "map" / "config.json", {"kind": "dspa_map", "cost": cost})
    write_json(tmp_path / "trained" / "train_summary.json", {"cost": {**cost, "stage": "dpo"}})
    write_json(tmp_path / "trained" / "config.json", {"model_type": "llama"})  # the model's own config
    assert recorded_cost(f"dspa:{tmp_path / 'map'}") == cost == recorded_cost(f"static-sae:{tmp_path / 'map'}")
    assert recorded_cost(str(tmp_path / "trained"))["stage"] == "dpo"
    assert recorded_cost("base") is None and recorded_cost("prompt-prefix") is None and recorded_cost(None) is None
    records = [_mc("base", 0.30), result_record("mmlu", "dspa", {"acc": metric(0.31, 0.01)}, ["acc"], {},
                                                details={"alignment_cost": cost})]
    write_results(tmp_path / "r" / "results.json", records)
    table = markdown_table(load_results([tmp_path / "r"])).splitlines()
    assert table[0].endswith("| alignment FLOPs | alignment wall s |")
    assert table[2].endswith("| — | — |") and table[3].endswith("| 3e+12 | 42 |")
