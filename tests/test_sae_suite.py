"""`saealign sae suite` on a tiny random model: one extraction per corpus for all layers, generic SAEs fine-tuned
into preference-domain ones, scored rows in suite.json, resume after a crash, no retraining on a rerun,
other settings refused."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_chat_model
from saealign import activations
from saealign.config import ConfigError
from saealign.sae import load_sae
from saealign.sae.suite import SAESuiteConfig, run_suite, suite_entries
from saealign.sae.train import _Trainer


class Counters:
    """Calls to the extraction and the trainer, patched in for the duration of a test."""

    def __init__(self, monkeypatch, fail_on_train: int | None = None):
        self.fills, self.reads, self.trained = [], [], []
        fill, read, train = activations.ActivationCache.fill, activations.read_residuals, _Trainer.train

        def counted_fill(cache, *args, **kwargs):
            self.fills.append(cache.dir.name)
            return fill(cache, *args, **kwargs)

        def counted_read(model, ids, mask, layers):
            self.reads.append(list(layers))
            return read(model, ids, mask, layers)

        def counted_train(trainer):
            if fail_on_train is not None and len(self.trained) + 1 == fail_on_train:
                raise RuntimeError("interrupted")
            self.trained.append((trainer.out_dir.parent.name, trainer.out_dir.name))
            return train(trainer)

        monkeypatch.setattr(activations.ActivationCache, "fill", counted_fill)
        monkeypatch.setattr(activations, "read_residuals", counted_read)
        monkeypatch.setattr(_Trainer, "train", counted_train)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, smol_tokenizer, shared_data):
    """A suite of 2 layers (one also at a second width) x 2 variants, built by a run cut off before its fifth SAE
    (the second preference-domain one) and a rerun that finishes it; the counters of both runs, and the rows
    suite.json held when the first run stopped."""
    root = tmp_path_factory.mktemp("suite")
    model = save_tiny_chat_model(root / "model", smol_tokenizer)
    cfg = SAESuiteConfig(model=str(model), data=str(shared_data), output=str(root / "suite"), layers=[1, 2], widths=[32],
                         wide_layers=[2], wide_width=64, k=4, generic_n=24, preference_n=24, eval_n=6, epochs=2,
                         finetune_epochs=2, batch_size=64, batch_tokens=2048, max_length=64, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        cut_off = Counters(patch, fail_on_train=5)
        with pytest.raises(RuntimeError, match="interrupted"):
            run_suite(cfg)
    cut_off.rows = [row["name"] for row in json.loads((root / "suite" / "suite.json").read_text())["saes"]]
    with pytest.MonkeyPatch.context() as patch:
        resumed = Counters(patch)
        report = run_suite(cfg)
    return cfg, report, cut_off, resumed


def test_each_corpus_is_extracted_once_for_all_layers(suite):
    cfg, report, cut_off, resumed = suite
    assert cut_off.fills == ["generic", "preference"] and resumed.fills == []  # the preference cache outlived the crash
    assert cut_off.reads and all(layers == [1, 2] for layers in cut_off.reads) and resumed.reads == []
    assert set(report["extraction"]) == {"generic", "preference"}
    assert all(part["tokens_kept"] > 0 for part in report["extraction"].values())
    assert not any((Path(cfg.output) / "activations").iterdir())  # each cache is freed once its variant's SAEs are saved


def test_crash_resumes_without_retraining_what_was_saved(suite):
    cfg, report, cut_off, resumed = suite
    generic = [("generic", "layer_1_w32"), ("generic", "layer_2_w32"), ("generic", "layer_2_w64")]
    assert cut_off.trained == [*generic, ("preference", "layer_1_w32")]
    assert cut_off.rows == [f"{variant}/{name}" for variant, name in cut_off.trained]  # written after each SAE
    assert resumed.trained == [("preference", "layer_2_w32"), ("preference", "layer_2_w64")]


def test_preference_saes_are_fine_tuned_generic_ones(suite):
    cfg, report, _, _ = suite
    out = Path(cfg.output)
    for layer, width in [(1, 32), (2, 32), (2, 64)]:
        generic = load_sae(out / f"generic/layer_{layer}_w{width}")
        preference = load_sae(out / f"preference/layer_{layer}_w{width}")
        # the trainer records the SAE it loaded as the start (a fresh start records none)
        assert preference.cfg.metadata["fine_tuned_from"]["fingerprint"] == generic.fingerprint()
        assert "fine_tuned_from" not in generic.cfg.metadata
        assert preference.cfg.metadata["training"]["init_from"] == str(out / f"generic/layer_{layer}_w{width}")
        assert preference.cfg.metadata["training"]["epochs"] == cfg.finetune_epochs
        assert preference.cfg.metadata["suite"]["init_from"] == f"generic/layer_{layer}_w{width}"
        assert preference.layer == generic.layer == layer and preference.d_sae == generic.d_sae == width
        assert not torch.equal(preference.W_dec, generic.W_dec) and not torch.equal(preference.b_dec, generic.b_dec)
    assert not list(out.rglob("checkpoint.pt"))  # optimizer states are dropped once an SAE is saved


def test_suite_json_has_a_scored_row_per_sae(suite):
    cfg, report, _, _ = suite
    saved = json.loads((Path(cfg.output) / "suite.json").read_text())
    names = [entry.name for entry in suite_entries(cfg)]
    assert [row["name"] for row in saved["saes"]] == names and len(names) == 6 and saved["complete"]
    for row in saved["saes"]:
        metrics = row["metrics"]
        assert 0 < metrics["fvu"] and 0 < metrics["l0"] <= cfg.k and metrics["tokens"] > 0 and metrics["texts"] == 6
        assert row["bar"] == {"fvu": metrics["fvu"] <= 0.15, "dead_fraction": metrics["dead_fraction"] <= 0.05,
                              "loss_increase": metrics["loss_increase"] <= 0.25}
        assert row["passes"] == all(row["bar"].values()) and row["seconds"]["train"] > 0
        assert (Path(cfg.output) / row["path"] / "cfg.json").exists()
    assert saved["total_seconds"] >= sum(row["seconds"]["train"] for row in saved["saes"])
    assert saved["model_fingerprint"] and saved["settings"]["layers"] == [1, 2]
    table = (Path(cfg.output) / "suite.md").read_text()
    assert all(f"`{name}`" in table for name in names)


def test_rerun_retrains_nothing_and_rescores_bar_only(suite, monkeypatch):
    cfg, report, _, _ = suite
    weights = sorted(Path(cfg.output).glob("*/layer_*/sae_weights.safetensors"))
    before = [path.stat().st_mtime_ns for path in weights]
    counters = Counters(monkeypatch)
    strict = run_suite(dataclasses.replace(cfg, max_fvu=0.0))
    lenient = run_suite(dataclasses.replace(cfg, max_fvu=1e9, device=None))
    assert counters.fills == counters.reads == counters.trained == []
    assert [path.stat().st_mtime_ns for path in weights] == before and len(weights) == 6
    assert all(not row["bar"]["fvu"] and not row["passes"] for row in strict["saes"])
    assert all(row["bar"]["fvu"] for row in lenient["saes"])


def test_generic_only_skips_the_fine_tunes_and_keeps_other_rows(suite, monkeypatch, tmp_path):
    cfg, _, _, _ = suite
    counters = Counters(monkeypatch)
    fresh = run_suite(dataclasses.replace(cfg, output=str(tmp_path / "generic"), layers=[2], wide_layers=[],
                                          variants=["generic"]))
    assert counters.fills == ["generic"] and counters.trained == [("generic", "layer_2_w32")]
    assert [row["name"] for row in fresh["saes"]] == ["generic/layer_2_w32"] and fresh["complete"]
    assert fresh["variants"] == ["generic"]
    assert not (tmp_path / "generic" / "preference").exists()
    kept = run_suite(dataclasses.replace(cfg, variants=["generic"]))  # the full suite's preference rows stay recorded
    assert counters.trained == [("generic", "layer_2_w32")] and len(kept["saes"]) == 6
    assert [row["variant"] for row in kept["saes"]] == ["generic"] * 3 + ["preference"] * 3
    assert "preference/layer_2_w64" in (Path(cfg.output) / "suite.md").read_text()


def test_other_settings_are_refused_by_name(suite, monkeypatch):
    cfg, _, _, _ = suite
    counters = Counters(monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \(k 4 there, 8 now; preference_n 24 there, 30 now\)"):
        run_suite(dataclasses.replace(cfg, k=8, preference_n=30))
    assert counters.fills == counters.trained == []


def test_cli_prints_the_finished_suite(suite):
    from typer.testing import CliRunner

    from saealign.cli import _register, app

    cfg, _, _, _ = suite
    _register()
    config = Path(cfg.output).parent / "suite-config.json"
    config.write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}))
    res = CliRunner().invoke(app, ["sae", "suite", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert "preference/layer_2_w64" in res.output and "suite.json" in res.output


def test_config_refuses_test_roles_and_unheld_evaluation():
    with pytest.raises(ConfigError, match="test role"):
        SAESuiteConfig(eval_role="test_helpful")
    with pytest.raises(ConfigError, match="held out"):
        SAESuiteConfig(eval_role="fit")
    with pytest.raises(ConfigError, match="wide_layers"):
        SAESuiteConfig(layers=[3], wide_layers=[9])
    with pytest.raises(ConfigError, match="variants must include generic"):
        SAESuiteConfig(variants=["preference"])
    with pytest.raises(ConfigError, match="variants must be one of"):
        SAESuiteConfig(variants=["generic", "domain"])
    entries = suite_entries(SAESuiteConfig(layers=[24, 9], wide_layers=[9]))  # every layer at --widths before the wide SAEs
    assert [entry.name for entry in entries] == ["generic/layer_9_w2560", "generic/layer_24_w2560", "generic/layer_9_w8192",
                                                 "preference/layer_9_w2560", "preference/layer_24_w2560",
                                                 "preference/layer_9_w8192"]
