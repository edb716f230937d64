"""Latent descriptions (token classes, the category rule, the resumable statistics) and the audit report,
on tiny random models."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import CharTok, build_tiny, char_triples
from saealign.audit import describe as describe_module
from saealign.audit.audit import category_shares, run_audit
from saealign.audit.describe import (DESCRIPTIONS, DescribeOptions, categorize, corpus_texts, describe_latents,
                                     generic_texts, token_class)
from saealign.audit.html import write_report
from saealign.dspa import DSPA, FitOptions, SteerConfig, fit_map
from saealign.runtime.generation import Sampling
from test_dspa import _tiny_saes

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = DescribeOptions(chunk_texts=2, top_contexts=3, window=3, lens_tokens=3, max_length=64)


def _texts(n=6):
    tok = CharTok()
    return [tok.apply_chat_template(list(t.prompt) + [{"role": "assistant", "content": t.chosen}])
            for t in char_triples(n)]


def test_token_classes_by_their_text():
    assert token_class(" the") == "function"
    assert token_class(",") == "punctuation"
    assert token_class("\n\n") == "formatting" and token_class("**") == "formatting"
    assert token_class("<|im_start|>", special=True) == "formatting"
    assert token_class(" Sorry") == "refusal" and token_class(" apolog") == "refusal"
    assert token_class(" However") == "discourse"
    assert token_class(" banana") == "content"


@pytest.mark.parametrize("shares, category", [
    ({"refusal": 0.3, "content": 0.7}, "refusal/safety"),
    ({"discourse": 0.35, "function": 0.6, "content": 0.05}, "discourse"),
    ({"formatting": 0.6, "content": 0.4}, "formatting"),
    ({"punctuation": 0.3, "function": 0.25, "content": 0.45}, "stylistic/tone"),
    ({"content": 0.8, "function": 0.2}, "content/topic"),
    ({"content": 0.4, "function": 0.3, "formatting": 0.3}, "mixed"),
])
def test_category_rule(shares, category):
    assert categorize(shares) == category


def test_test_roles_are_refused():
    with pytest.raises(ValueError, match="test data"):
        corpus_texts("/nonexistent", CharTok(), ["fit", "test_helpful"])


def test_generic_text_loads(shared_data):
    texts = generic_texts(shared_data, CharTok())
    assert len(texts) > 3000 and all(t.startswith("<u>") for t in texts[:5])


def test_descriptions_resume_after_an_interruption(tmp_path, monkeypatch):
    model, (_, sae) = build_tiny("llama"), _tiny_saes()
    texts = _texts(6)
    full = describe_latents(model, CharTok(), sae, texts, tmp_path / "full", options=OPTIONS, progress=False)
    assert full["tokens"] > 0 and len(full["latents"]) == sae.d_sae
    some = next(d for d in full["latents"].values() if d["contexts"])
    context = some["contexts"][0]
    assert 0 <= context["marked"] < len(context["tokens"]) and set(some["logit_lens"]) == {"promoted", "suppressed"}

    calls = {"n": 0}
    real = describe_module.read_residuals

    def failing_after_one_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(describe_module, "read_residuals", failing_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        describe_latents(model, CharTok(), sae, texts, tmp_path / "resumed", options=OPTIONS, progress=False)
    calls["n"] = 10  # no more failures; count the batches the resumed run needs
    resumed = describe_latents(model, CharTok(), sae, texts, tmp_path / "resumed", options=OPTIONS, progress=False)
    assert calls["n"] == 10 + 2, "the resumed run should redo only the two chunks not saved"
    for result in (full, resumed):
        result.pop("tokens_per_second")
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)
    with pytest.raises(ValueError, match="other settings"):
        describe_latents(model, CharTok(), sae, texts, tmp_path / "resumed", progress=False,
                         options=DescribeOptions(chunk_texts=3, max_length=64))


def test_audit_report_is_static_and_complete(tmp_path):
    model = build_tiny("llama")
    sae_in, sae_out = _tiny_saes()
    dspa_map = fit_map(model, CharTok(), sae_in, sae_out, char_triples(12), FitOptions(batch_size=4), progress=False)
    dspa = DSPA(dspa_map, sae_in, sae_out, SteerConfig(alpha=0.5, k_diff=8, k_prompt=16, record=True))
    descriptions = describe_latents(model, CharTok(), sae_out, _texts(6), tmp_path / "describe", options=OPTIONS,
                                    progress=False)
    prompts = [(kind, [{"role": "user", "content": text}]) for kind, text in
               (("harmful", "cook math poem"), ("harmful", "code travel"), ("benign", "music garden"), ("benign", "help me"))]
    result = run_audit(model, CharTok(), dspa, prompts, descriptions, Sampling(max_new_tokens=5), n_boot=200,
                       progress=False)
    assert result["edited_tokens"] > 0, "nothing was edited; the report would show nothing"
    assert abs(sum(s["share"] for s in result["category_shares"].values()) - 1) < 1e-9
    assert result["separating"] and result["kinds"] == ["harmful", "benign"]
    index = write_report(result, descriptions, tmp_path / "report")
    pages = {p.name for p in (tmp_path / "report" / "latents").glob("*.html")}
    assert pages == {f"latent_{r['latent']}.html" for r in result["latents"]}
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / "category_shares.png").exists()
    for page in [index, *(tmp_path / "report" / "latents").glob("*.html")]:
        html = page.read_text()
        assert not re.search(r"https?://|<script|<link|@import|src=", html), page
        for target in re.findall(r"href='([^']+)'", html):
            assert (page.parent / target).resolve().exists(), (page, target)
    if shutil.which("chromium") is None:  # the browser part only where Chromium is installed
        return
    spec = importlib.util.spec_from_file_location("audit_screenshot", ROOT / "benchmarks" / "audit_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shot = module.screenshot(index, tmp_path / "shot.png", height=600)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_category_share_interval_covers_the_share():
    records = [{"edits": {"1": {"mass": m1}, "2": {"mass": m2}}} for m1, m2 in ((1.0, 0.0), (2.0, 1.0), (0.5, 3.0))]
    shares = category_shares(records, {1: "discourse", 2: "formatting"}, n_boot=500)
    assert shares["discourse"]["share"] == pytest.approx(3.5 / 7.5)
    for s in shares.values():
        assert s["low"] <= s["share"] <= s["high"]
    assert sum(s["share"] for s in shares.values()) == pytest.approx(1.0)


def test_latents_without_a_description_are_counted_as_undescribed():
    from saealign.audit.audit import category_shares

    records = [{"edits": {"3": {"mass": 2.0}, "7": {"mass": 1.0}}}, {"edits": {"3": {"mass": 1.0}}}]
    shares = category_shares(records, {7: "formatting"}, n_boot=50)
    assert shares["undescribed"]["share"] == pytest.approx(0.75) and shares["formatting"]["share"] == pytest.approx(0.25)
    assert shares["mixed"]["share"] == 0.0
