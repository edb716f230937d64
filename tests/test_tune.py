"""Typed map metadata (round trip, unknown keys refused, format-1 maps read), the one steering config, and
`saealign dspa tune` choosing settings on held-out data that `load_method` then uses."""

import json

import pytest
from typer.testing import CliRunner

from saealign.config import ConfigError
from saealign.dspa import DSPAMap, Recommended, TuneConfig, read_metadata, run_tune
from saealign.dspa.map import record_recommended
from saealign.steering import LatentSteering, SteeringOptions, load_method
from test_dspa_cli import DEMO, _cli, _fit_args, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


@pytest.fixture(scope="module")
def fitted(tiny_setup, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("map") / "map"
    res = CliRunner().invoke(_cli(), _fit_args(tiny_setup, out))
    assert res.exit_code == 0, res.output
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_metadata_round_trip_and_recommended_used_by_default(fitted, tmp_path):
    map_dir = _copy(fitted, tmp_path / "map")
    chosen = Recommended(dspa=LatentSteering(mode="both", alpha=0.7, k_diff=5, threshold=0.0),
                         static_sae=LatentSteering(alpha=0.3), repe=SteeringOptions(coef=3.0), source="a test")
    record_recommended(map_dir, chosen)
    meta = read_metadata(map_dir)
    assert meta.recommended == chosen and json.loads((map_dir / "config.json").read_text())["format_version"] == 2
    assert DSPAMap.load(map_dir).meta == meta
    dspa = load_method(f"dspa:{map_dir}")
    assert (dspa.cfg.mode, dspa.cfg.alpha, dspa.cfg.k_diff, dspa.cfg.k_prompt) == ("both", 0.7, 5, 32)  # k_prompt: paper's
    assert load_method(f"dspa:{map_dir}", alpha=0.1).cfg.alpha == 0.1  # a given option wins
    assert load_method(f"static-sae:{map_dir}").cfg.alpha == 0.3
    assert load_method(f"repe:{map_dir}").coef == 3.0


@pytest.mark.parametrize("edit, key", [
    (lambda c: c.update(recomended={}), "'recomended'"),
    (lambda c: c["recommended"]["dspa"].update(alhpa=0.5), "'recommended.dspa.alhpa'"),
    (lambda c: c["options"].update(stats="mean"), "'options.stats'"),
])
def test_unknown_metadata_key_is_refused_with_key_and_file(fitted, tmp_path, edit, key):
    map_dir = _copy(fitted, tmp_path / "map")
    config = json.loads((map_dir / "config.json").read_text())
    edit(config)
    (map_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{map_dir / 'config.json'}: unknown key {key}"):
        DSPAMap.load(map_dir)


def test_bad_recommended_value_is_refused(fitted, tmp_path):
    map_dir = _copy(fitted, tmp_path / "map")
    config = json.loads((map_dir / "config.json").read_text())
    config["recommended"]["dspa"]["mode"] = "sideways"
    (map_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: recommended.dspa.mode must be one of ablate, augment, both"):
        read_metadata(map_dir)


def test_format_1_map_loads_its_known_keys(fitted, tmp_path):
    """What `dspa fit` and `write_recommended` wrote before the metadata was typed."""
    map_dir = _copy(fitted, tmp_path / "map")
    config = json.loads((map_dir / "config.json").read_text())
    del config["recommended"]
    config.update({"format_version": 1, "stat": "density", "threshold": 0.002,
                   "recommended": {"mode": "both", "alpha": 0.1, "k_diff": 256, "k_prompt": 128, "threshold": 0.003},
                   "recommended_static": {"mode": "ablate", "alpha": 0.2, "k_diff": 256},
                   "recommended_repe": {"coef": 4.0}, "recommended_from": "benchmarks/results/dspa_sweep_val.json"})
    (map_dir / "config.json").write_text(json.dumps(config))
    meta = DSPAMap.load(map_dir).meta
    assert meta.recommended.dspa == LatentSteering(mode="both", alpha=0.1, k_diff=256, k_prompt=128, threshold=0.003)
    assert meta.recommended.static_sae.k_diff == 256 and meta.recommended.repe.coef == 4.0
    assert meta.recommended.source == "benchmarks/results/dspa_sweep_val.json" and meta.threshold == 0.002
    del config["format_version"]  # unversioned maps are format 1 too
    config["recommended_stati"] = {}
    (map_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown key 'recommended_stati'"):
        DSPAMap.load(map_dir)


def test_one_steering_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="mode must be one of ablate, augment, both; 'sideways'"):
        SteeringOptions(mode="sideways")
    with pytest.raises(ConfigError, match="alpha must be >= 0, got -1"):
        LatentSteering(alpha=-1)
    from saealign.eval.pref import PrefEvalConfig
    from saealign.dspa.steer import SteerConfig

    with pytest.raises(ConfigError, match="k_diff must be >= 1"):
        PrefEvalConfig(data="x", k_diff=0)
    with pytest.raises(ConfigError, match="mode must be one of"):
        SteerConfig(mode="sideways")
    with pytest.raises(ConfigError, match="test role"):
        TuneConfig(map="m", data="d", data_role="test_helpful")


def test_cli_refuses_a_bad_mode_before_loading(tiny_setup):  # noqa: F811
    res = CliRunner().invoke(_cli(), ["generate", "-p", "hi", "--model", str(tiny_setup / "model"), "--mode", "sideways"])
    assert res.exit_code != 0 and "mode must be one of ablate, augment, both" in res.output


def _swapped(path, out):
    """The same pairs with chosen and rejected exchanged: every setting's reward accuracy becomes 1 - it."""
    rows = [json.loads(line) for line in open(path)]
    out.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return out


GRID = ["--modes", "both", "--alphas", "0.0", "--alphas", "3.0", "--k-diffs", "12", "--k-prompts", "16",
        "--thresholds", "0.0", "--coefs", "0.0", "--coefs", "8.0"]


def test_tune_records_a_choice_that_steers_and_load_method_uses_it(fitted, tiny_setup, tmp_path):  # noqa: F811
    """alpha 0 and coef 0 are no-ops (every pair ties: reward accuracy exactly 0.5). On the pairs or on the
    same pairs swapped, a steering setting scores above 0.5, so the choice must be one that steers."""
    map_dir = _copy(fitted, tmp_path / "map")
    app, runner = _cli(), CliRunner()
    for data in (DEMO, _swapped(DEMO, tmp_path / "swapped.jsonl")):
        res = runner.invoke(app, ["dspa", "tune", str(map_dir), "--data", str(data), "--n", "16",
                                  "--max-length", "128", "--model", str(tiny_setup / "model"), *GRID])
        assert res.exit_code == 0, res.output
        chosen = read_metadata(map_dir).recommended
        entries = {(e.method, e.setting.alpha, e.setting.coef): e.metrics["reward_acc"]["value"] for e in chosen.sweep.entries}
        if entries[("dspa", 3.0, None)] > 0.5:
            break
    assert entries[("dspa", 0.0, None)] == 0.5 and entries[("repe", None, 0.0)] == 0.5  # the no-ops
    assert chosen.dspa.alpha == 3.0  # a setting that steers, not the no-op
    assert chosen.source == "saealign dspa tune" and chosen.sweep.data.n == 16
    assert "recorded in" in res.output
    dspa = load_method(f"dspa:{map_dir}")  # the recorded choice, by default
    assert dspa.cfg.steering_options() == chosen.dspa.steering_options()


def test_tune_api_keeps_the_rule(fitted, tiny_setup, tmp_path):  # noqa: F811
    """Coordinate-wise: the combined setting holds each axis's best value; the choice is the best scored."""
    from saealign.models import load_model

    map_dir = _copy(fitted, tmp_path / "map")
    model, tok = load_model(str(tiny_setup / "model"))
    seen = []
    chosen = run_tune(TuneConfig(map=str(map_dir), data=DEMO, data_role=None, n=12, max_length=128, n_boot=50,
                                 modes=["ablate", "both"], alphas=[0.5, 2.0], k_diffs=[8], k_prompts=[16],
                                 thresholds=[0.0], coefs=[1.0]), model, tok, on_entry=seen.append)
    assert seen == chosen.sweep.entries
    rank = lambda e: (e.metrics["reward_acc"]["value"], e.metrics["reward_margin"]["value"])  # noqa: E731
    for method, setting in (("dspa", chosen.dspa), ("static-sae", chosen.static_sae)):
        own = [e for e in seen if e.method == method]
        combined = own[-1].setting  # scored last: each axis at its best value around the centre
        for axis, values in (("mode", ["ablate", "both"]), ("alpha", [0.5, 2.0])):
            around = {v: next(e for e in own if getattr(e.setting, axis) == v
                              and all(getattr(e.setting, k) == getattr(own[0].setting, k) for k in ("mode", "alpha", "k_diff")
                                      if k != axis)) for v in values}
            assert getattr(combined, axis) == max(values, key=lambda v: rank(around[v]))
        assert max(own, key=rank).setting.steering_options() == setting.steering_options()
