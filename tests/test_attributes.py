"""Issue #11, library part: attribute scorers, best-of-K triples, paired statistics, balanced accuracy,
the attribute benchmark harness and the map diagnostics (with a shuffled-label negative control)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CharTok, build_tiny
from saealign.best_of_k import BestOfKConfig, build_best_of_k, pick
from saealign.data import load_preferences
from saealign.eval.attributes import balance_weights, distinct_n, get_scorer, register_scorer, scorer_names

# --- scorers ---------------------------------------------------------------------------------------

REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot provide instructions for making weapons.",
            "As an AI, I don't have personal opinions.", "It's not appropriate to insult people.",
            "I am unable to assist with that request.", "I’m sorry, I won’t do that.",  # typographic apostrophes
            "  ", "I would advise against doing this, as it is dangerous.",
            "I'm sorry for any misunderstanding, but as a chatbot designed to assist with cheese, I'm not equipped to help.",
            "No, I'm sorry for any offense. I'm here to help, not to offend."]
ANSWERS = ["Sure! Here is how to bake bread: mix flour, water and yeast.", "Rice is cooked by simmering it in water.",
           "I can help with that. First, preheat the oven.", "The capital of France is Paris.",
           "I'm so sorry to hear that you're going through a tough time. Here's what can help: rest.",
           "I'm sorry for the confusion, but I'd be happy to help you with that.",
           "Paris is lovely. " * 15 + "I'm sorry for the long answer."]  # a late apology is not a refusal


@pytest.mark.parametrize("text", REFUSALS)
def test_refusal_marks_refusals(text):
    assert get_scorer("refusal")("q", text) == 1.0


@pytest.mark.parametrize("text", ANSWERS)
def test_refusal_passes_answers(text):
    assert get_scorer("refusal")("q", text) == 0.0


def test_repetition_exact_values():
    rep = get_scorer("repetition")
    assert rep("q", "a b c a b c") == pytest.approx(0.25)  # 3-grams abc bca cab abc: 3 distinct of 4
    assert rep("q", "a a a a a") == pytest.approx(2 / 3)
    assert rep("q", "one two") == 0.0 and rep("q", "A b C a B c") == pytest.approx(0.25)  # case-insensitive
    assert rep.goal == "min"


def test_length_counts_whitespace_words():
    assert get_scorer("length")("q", " one two\tthree\nfour  ") == 4.0


def test_refuse_iff_harmful_depends_on_kind():
    s = get_scorer("refuse_iff_harmful")
    assert s("q", REFUSALS[0], "harmful") == 1.0 and s("q", ANSWERS[0], "harmful") == 0.0
    assert s("q", REFUSALS[0], "benign") == 0.0 and s("q", ANSWERS[0], "benign") == 1.0
    with pytest.raises(ValueError, match="needs each prompt's kind"):
        s("q", ANSWERS[0])


def test_registry():
    @register_scorer("test_exclaims", version="7", goal="max")
    def exclaims(prompt: str, response: str) -> float:
        """Count of exclamation marks."""
        return response.count("!")

    s = get_scorer("test_exclaims")
    assert s("q", "a!b!") == 2.0 and "test_exclaims" in scorer_names()
    assert s.provenance() == {"name": "test_exclaims", "version": "7", "goal": "max"}
    assert s.description == "Count of exclamation marks."
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test_exclaims", version="8")(exclaims)
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*refusal"):
        get_scorer("nope")


def test_distinct_2():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2) and distinct_n(["x"], 2) == 0.0


# --- statistics ------------------------------------------------------------------------------------

def test_balanced_accuracy_weights_each_half_equally():
    from saealign.eval.attribute_bench import method_metrics

    kinds = ["harmful"] * 3 + ["benign"]
    correct, base = np.array([1.0, 0, 0, 1]), np.array([0.0, 0, 0, 1])
    metrics, delta, headline = method_metrics(get_scorer("refuse_iff_harmful"), correct, base, kinds, ["a b c"] * 4,
                                              (4.0, 4), n_boot=100, seed=0)
    assert metrics["balanced_accuracy"].value == pytest.approx((1 / 3 + 1) / 2)  # plain accuracy is 1/2
    assert metrics["refused_harmful"].value == pytest.approx(1 / 3) and metrics["answered_benign"].value == 1.0
    assert delta["balanced_accuracy"].value == pytest.approx((1 / 3) / 2)  # one more harmful refusal: half of 1/3
    assert delta["answered_benign"].value == 0.0 and metrics["perplexity"].value == pytest.approx(np.e)
    assert headline[:3] == ["balanced_accuracy", "refused_harmful", "answered_benign"]
    assert balance_weights(kinds) == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    with pytest.raises(ValueError, match="both kinds"):
        balance_weights(["harmful", "harmful"])


def test_paired_delta_uses_the_pairing():
    from saealign.stats import paired_difference  # what method_metrics uses for the deltas to base

    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, size=200)  # large per-prompt spread shared by both methods
    same_shift = paired_difference(base + 0.1, base, n_boot=500, seed=0)
    assert same_shift.value == pytest.approx(0.1) and same_shift.ci95 == pytest.approx([0.1, 0.1])
    noise = paired_difference(base + rng.choice([-1.0, 1.0], size=200), base, n_boot=500, seed=0)
    assert noise.ci95[0] < 0 < noise.ci95[1]  # no effect: the interval covers 0
    assert noise.ci95[1] - noise.ci95[0] < 0.5  # and is set by the +-1 differences, not the spread of 10


def test_pick_best_worst_ties_and_margin():
    assert (o := pick([0.2, 0.5, 0.1, 0.5], "max", 0.0)).chosen == 1 and o.rejected == 2 and o.skipped is None
    assert (o := pick([0.2, 0.5, 0.1, 0.1], "min", 0.0)).chosen == 2 and o.rejected == 1
    assert pick([1.0, 1.0, 1.0], "max", 0.0).skipped == "tie"
    assert pick([0.0, 0.3], "max", 0.5).skipped == "margin" and pick([0.0, 0.5], "max", 0.5).skipped is None


# --- best-of-K on a tiny model -----------------------------------------------------------------------

@register_scorer("test_checksum", version="1", goal="max")
def _checksum(prompt: str, response: str) -> float:
    """Character codes summed modulo 7: a spread of scores from random tiny-model answers."""
    return float(sum(map(ord, response)) % 7)


@register_scorer("test_constant", version="1")
def _constant(prompt: str, response: str) -> float:
    return 1.0


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama"), CharTok()


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"question {i} about cooking" for i in range(7)) + "\nquestion 0 about cooking\n")
    return path


def _bok(out, prompts_file, **kw) -> BestOfKConfig:
    base = dict(output=str(out), sources=[str(prompts_file)], scorer="test_checksum", k=3, max_new_tokens=6,
                batch_prompts=3, batch_size=4)
    return BestOfKConfig(**{**base, **kw})


def test_best_of_k_triples_provenance_and_load(tiny, tmp_path, prompts_file):
    model, tok = tiny
    prov = build_best_of_k(_bok(tmp_path / "a", prompts_file, min_margin=4.0), model, tok, progress=False)
    c = prov["counts"]
    assert c["prompts"] == 7  # the duplicate prompt is kept once
    assert c["prompts"] == c["triples"] + c["skipped_tie"] + c["skipped_margin"]
    assert c["triples"] and c["skipped_margin"]  # the seeds give both, so both paths are checked
    rows = [json.loads(line) for line in (tmp_path / "a" / "triples.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == c["triples"] and len(samples) == 7 and all(len(s["answers"]) == 3 for s in samples)
    for r in rows:
        assert r["score_chosen"] - r["score_rejected"] >= 4.0
    for s in samples:
        gap = max(s["scores"]) - min(s["scores"])
        assert s["skipped"] == ("tie" if gap == 0 else "margin" if gap < 4.0 else None)
    saved = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert saved["scorer"] == {"name": "test_checksum", "version": "1", "goal": "max", "description": _checksum.__doc__}
    assert saved["sampling"]["temperature"] == 0.9 and saved["sampling"]["k"] == 3 and saved["model"]["fingerprint"]
    triples = load_preferences(tmp_path / "a" / "triples.jsonl")
    assert [t.chosen for t in triples] == [r["chosen"][0]["content"] for r in rows]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_samples_share_one_prefill_and_equal_whole_rows(arch):
    """K samples per prompt prefill each prompt once (a forward over the prompts alone, then decoding of
    n x K rows); greedily they equal the plain answers, left padding included, and sampled they differ."""
    from saealign.runtime.generation import Sampling, generate

    model, tok = build_tiny(arch), CharTok()
    prompts = ["short", "a much longer prompt about bread", "medium prompt"]
    rows_seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows_seen.append(o.shape[0]))
    greedy = generate(model, tok, prompts, Sampling(0.0, 1.0, 5), batch_size=16, num_samples=3, progress=False)
    handle.remove()
    assert rows_seen[0] == 3 and set(rows_seen[1:]) == {9}, rows_seen  # one prefill of the 3 prompts
    plain = generate(model, tok, prompts, Sampling(0.0, 1.0, 5), batch_size=16, progress=False)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in plain for _ in range(3)]
    sampled = generate(model, tok, prompts, Sampling(1.0, 1.0, 8), batch_size=16, num_samples=4, progress=False)
    assert len(sampled) == 12 and all(len({tuple(g.token_ids) for g in sampled[i:i + 4]}) > 1 for i in (0, 4, 8))


def test_shuffled_labels_swap_a_seeded_half(tmp_path):
    from saealign.best_of_k import write_shuffled_labels

    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
                                       "score_chosen": 1, "score_rejected": 0}) + "\n" for i in range(40)))
    swapped = write_shuffled_labels(src, tmp_path / "s.jsonl", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    flipped = [r["chosen"].startswith("bad") for r in rows]
    assert sum(flipped) == swapped == 20  # exactly half: the swaps cancel the common direction
    assert flipped != sorted(flipped, reverse=True)  # a random half, not the first
    assert all(r["score_chosen"] == (0 if f else 1) for r, f in zip(rows, flipped))
    assert write_shuffled_labels(src, tmp_path / "s2.jsonl", seed=0) == swapped  # seeded


def test_best_of_k_ties_skipped(tiny, tmp_path, prompts_file):
    prov = build_best_of_k(_bok(tmp_path / "t", prompts_file, scorer="test_constant"), *tiny, progress=False)
    assert prov["counts"]["triples"] == 0 and prov["counts"]["skipped_tie"] == 7
    assert (tmp_path / "t" / "triples.jsonl").read_text() == ""


def test_best_of_k_resume_is_exact_and_other_settings_refused(tiny, tmp_path, prompts_file, monkeypatch):
    import saealign.runtime.generation as generation

    model, tok = tiny
    build_best_of_k(_bok(tmp_path / "full", prompts_file), model, tok, progress=False)
    real, calls = generation.generate_chat, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_chat", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_best_of_k(_bok(tmp_path / "cut", prompts_file), model, tok, progress=False)
    monkeypatch.setattr(generation, "generate_chat", real)
    with open(tmp_path / "cut" / "triples.jsonl", "a") as f:
        f.write('{"torn": ')  # a write after the last committed batch
    build_best_of_k(_bok(tmp_path / "cut", prompts_file), model, tok, progress=False)
    assert (tmp_path / "full" / "triples.jsonl").read_text().count("\n") >= 2
    for name in ("triples.jsonl", "samples.jsonl"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(k 3 there, 4 now\)"):
        build_best_of_k(_bok(tmp_path / "full", prompts_file, k=4), model, tok, progress=False)


def test_merge_triples_of_parts_by_kind_and_refuses_other_sampling(tiny, tmp_path, prompts_file):
    from typer.testing import CliRunner

    from saealign.best_of_k import merge_triples
    from saealign.cli import app, data_cmd  # noqa: F401 (registers the command)

    model, tok = tiny
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"another question {i}" for i in range(5)) + "\nquestion 0 about cooking\n")
    a = build_best_of_k(_bok(tmp_path / "a", prompts_file, sources=[f"benign={prompts_file}"]), model, tok, progress=False)
    b = build_best_of_k(_bok(tmp_path / "b", prompts_file, sources=[f"harmful={other}", f"benign={other}"], seed=1),
                        model, tok, progress=False)
    merged = merge_triples([tmp_path / "a", tmp_path / "b" / "triples.jsonl"], tmp_path / "m")
    rows = [json.loads(line) for line in (tmp_path / "m" / "triples.jsonl").read_text().splitlines()]
    dup = merged["counts"]["duplicates_dropped"]
    assert len(rows) == a["counts"]["triples"] + b["counts"]["triples"] - dup == merged["counts"]["triples"]
    assert len({r["id"] for r in rows}) == len(rows) and merged["counts"]["prompts"] == 7 + 12
    assert [p["path"] for p in merged["parts"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    result = CliRunner().invoke(app, ["data", "merge-triples", str(tmp_path / "a"), str(tmp_path / "b"),
                                      "--output", str(tmp_path / "mb"), "--kind", "benign"])
    assert result.exit_code == 0, result.output
    benign = [json.loads(line) for line in (tmp_path / "mb" / "triples.jsonl").read_text().splitlines()]
    assert benign and {r["kind"] for r in benign} == {"benign"} and len(benign) < len(rows)
    build_best_of_k(_bok(tmp_path / "c", prompts_file, temperature=0.5), model, tok, progress=False)
    with pytest.raises(ValueError, match=r"c/provenance.json: field sampling.temperature is 0.5, expected 0.9"):
        merge_triples([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_best_of_k_kind_scorer_needs_kinds(tiny, tmp_path, prompts_file):
    with pytest.raises(ValueError, match="needs each prompt's kind"):
        build_best_of_k(_bok(tmp_path / "k", prompts_file, scorer="refuse_iff_harmful"), *tiny, progress=False)
    with pytest.raises(ValueError, match="--k-by-kind"):
        _bok(tmp_path / "k", prompts_file, k_by_kind=["evil=3"])


# --- the benchmark harness on a tiny model -------------------------------------------------------------

def test_eval_attributes_records_resume_and_report(tiny, tmp_path, monkeypatch):
    import saealign.runtime.generation as generation
    from saealign.eval.attribute_bench import AttributeEvalConfig, run_attribute_eval
    from saealign.eval.report import load_results

    model, tok = tiny
    harmful, benign = tmp_path / "harmful.txt", tmp_path / "benign.txt"
    harmful.write_text("\n".join(f"bad thing {i}" for i in range(5)))
    benign.write_text("\n".join(f"good thing {i}" for i in range(4)))
    cfg = dict(output=str(tmp_path / "ev"), scorer="refuse_iff_harmful", sources=[f"harmful={harmful}", f"benign={benign}"],
               methods=["base", "pp=prompt-prefix"], max_new_tokens=5, n_boot=200)
    result = run_attribute_eval(AttributeEvalConfig(**cfg), model, tok, progress=False)
    base, pp = result
    assert base.metrics["refused_harmful"].n == 5 and base.metrics["answered_benign"].n == 4
    assert base.deltas["balanced_accuracy"].value == 0.0 and pp.baseline == "base"
    assert base.metrics["perplexity"].value > 1 and pp.metrics["distinct_2"].value >= 0
    assert {r.method for _, r in load_results([tmp_path / "ev"])} == {"base", "pp"}
    assert (tmp_path / "ev" / "deltas.png").stat().st_size > 0
    assert "Δ balanced_accuracy" in (tmp_path / "ev" / "results.md").read_text()

    def no_generation(*a, **k):
        raise AssertionError("answers should have been reused")

    import saealign.runtime.scoring as scoring

    real_scoring = scoring.score_triples
    monkeypatch.setattr(generation, "generate_chat", no_generation)
    monkeypatch.setattr(scoring, "score_triples", no_generation)  # perplexity of unchanged answers: from the cache
    again = run_attribute_eval(AttributeEvalConfig(**cfg), model, tok, progress=False)
    assert again[1].metrics == pp.metrics
    answers = tmp_path / "ev" / "answers" / "pp.jsonl"
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    records[0]["answer"] += " and more words"
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    scored = []
    monkeypatch.setattr(scoring, "score_triples", lambda *a, **k: scored.append(1) or real_scoring(*a, **k))
    edited = run_attribute_eval(AttributeEvalConfig(**cfg), model, tok, progress=False)
    assert scored == [1], "only the method whose answers changed is scored again"
    assert edited[1].metrics["perplexity"].value != pp.metrics["perplexity"].value
    with pytest.raises(ValueError, match="answers of another method"):  # same name, other method: not reused
        run_attribute_eval(AttributeEvalConfig(**{**cfg, "methods": ["base", "pp=prompt-prefix:Be brief."]}), model, tok,
                           progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_attribute_eval(AttributeEvalConfig(**{**cfg, "max_new_tokens": 6}), model, tok, progress=False)


# --- map diagnostics and the shuffled-label negative control ---------------------------------------------

def _synthetic(n: int, seed: int, m_in: int = 40, m_out: int = 30):
    """Prompt statistics g and realised Δρ with a prompt-conditional relation Δρ = g W + noise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m_in, m_out, generator=torch.Generator().manual_seed(123))
    g = (torch.rand(n, m_in, generator=gen) < 0.2).float()
    return g, g @ w + 2.0 * torch.randn(n, m_out, generator=gen)


def _map(g: torch.Tensor, delta: torch.Tensor):
    from saealign.dspa.map import DSPAMap, FitOptions, MapMetadata, SparseSum

    a_sum = SparseSum(g.shape[1], delta.shape[1])
    a_sum.add_outer(g, delta)  # what fit_map accumulates per batch
    meta = MapMetadata(model="synthetic", l_in=0, l_out=1, sae_in={}, sae_out={}, m_in=g.shape[1], m_out=delta.shape[1],
                       options=FitOptions(), data_fingerprint="synthetic")
    return DSPAMap(a_sum, g.sum(0).double(), len(g), meta, delta_sum=delta.sum(0).double())


def test_map_signal_real_vs_shuffled_labels():
    from saealign.dspa.diagnostics import HeldOutStatistics, correlations, map_signal

    g_fit, d_fit = _synthetic(300, seed=1)
    flips = torch.where(torch.rand(300, generator=torch.Generator().manual_seed(7)) < 0.5, -1.0, 1.0)
    real, shuffled = _map(g_fit, d_fit), _map(g_fit, d_fit * flips[:, None])  # swapping y+ and y- negates Δρ
    held_out = HeldOutStatistics(*_synthetic(200, seed=2))
    good, control = map_signal([real, shuffled], held_out, k_prompt=8, k_diff=6, n_boot=500)
    assert good["signal"] and good["agreement"]["value"] > 0.8 and good["pearson"] > 0.3
    assert good["alignment"]["value"] > good["alignment_shuffled_prompts"]["value"]  # conditioning adds signal
    assert not control["signal"] and control["agreement"]["ci95"][0] < 0.5 < control["agreement"]["ci95"][1]
    overlap = good["edited_overlap_static"]["value"]
    assert 0 < overlap < 0.9, "a prompt-conditional map edits other latents than static-sae on most prompts"
    same_prompt = HeldOutStatistics(held_out.g[:1].expand(50, -1), held_out.delta[:50])
    uniform = map_signal(real, same_prompt, k_prompt=8, k_diff=6, n_boot=100)[0]
    assert uniform["prompt_latents_overlap_mean"]["value"] == 1.0  # one prompt repeated: its top latents are the mean's
    from saealign.dspa.diagnostics import jaccard

    assert jaccard(torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3]]), torch.tensor([[3.0, 2, 0, 1]]), 2).tolist() == [1.0, 0.0]
    few = HeldOutStatistics(held_out.g[:5], held_out.delta[:5])
    assert map_signal(real, few, k_prompt=8, k_diff=6, n_boot=100)[0]["signal"] is None  # too few to decide
    assert correlations(np.array([1.0, 2, 3]), np.array([1.0, 1, 1]))["pearson"] is None
    assert correlations(np.array([1.0, 2, 3, 4]), np.array([1.0, 4, 9, 100]))["spearman"] == pytest.approx(1.0)


# --- the harmless split and the report ------------------------------------------------------------------

def test_harmless_roles_follow_splits_md(shared_data):
    from saealign.data import HARMLESS_ROLES, harmless_roles, select_triples

    roles = harmless_roles(shared_data)
    sizes = [len(roles[r]) for r in HARMLESS_ROLES]
    total = sum(sizes)
    assert sizes[:2] == [round(0.4 * total), round(0.1 * total)] and total == 2312
    ids = [{t.meta["line"] for t in roles[r]} for r in HARMLESS_ROLES]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    validation = select_triples(shared_data, "harmless_validation")
    assert [t.chosen for t in validation] == [t.chosen for t in roles["harmless_validation"]]
    test = select_triples(shared_data, "test_harmless")  # the protocol's role is the test part, not the whole
    assert [t.chosen for t in test] == [t.chosen for t in roles["test_harmless"]]
    assert len(select_triples(shared_data, "harmless_all")) == total
    with pytest.raises(ValueError, match="harmless_fit"):
        select_triples(shared_data, "harmless")


def test_report_reads_a_file_of_records(tmp_path):
    from saealign.eval.report import load_results
    from saealign.results import ResultRecord, write_results
    from saealign.stats import Estimate

    records = [ResultRecord("attr:x", m, {"x": Estimate(1.0)}, ["x"], {}) for m in ("base", "pp")]
    path = write_results(tmp_path / "results.json", records)
    assert load_results([path]) == [(path, r) for r in records]


def test_load_prompts_excludes_seen_texts_and_long_prompts(tmp_path):
    from saealign.best_of_k import load_prompts

    (tmp_path / "fit.txt").write_text("seen question\nonly in fit\n")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                 ["seen question", "new question", "a b c d e f", "new question"]))
    prompts = load_prompts([f"harmful={tmp_path / 'test.jsonl'}"], exclude=[str(tmp_path / "fit.txt")],
                           max_prompt_words=5)
    assert [(p.text, p.kind) for p in prompts] == [("new question", "harmful")]  # seen, long and repeated dropped


def test_centred_map_drops_the_prompt_independent_direction():
    """Δρ = a global direction (same for every prompt) + a prompt-conditional part: the plain map's edits are the
    static ones on most prompts; centring leaves the conditional part, whose edits follow the prompt."""
    from saealign.dspa.diagnostics import HeldOutStatistics, map_signal

    def data(n, seed):
        g, delta = _synthetic(n, seed)
        return g, delta + 15.0 * torch.linspace(-1, 1, delta.shape[1])  # the global direction dominates
    real = _map(*data(400, seed=1))
    held_out = HeldOutStatistics(*data(200, seed=2))
    plain, = map_signal(real, held_out, k_prompt=8, k_diff=6, n_boot=300)
    centred, = map_signal(real, held_out, k_prompt=8, k_diff=6, n_boot=300, center=True)
    assert plain["edited_overlap_static"]["value"] > 0.9 > 0.5 > centred["edited_overlap_static"]["value"]
    from saealign.dspa.diagnostics import jaccard
    from saealign.dspa.steer import prompt_scores

    centred_scores = prompt_scores(real.matrix(center=True), held_out.g, 8, real.mean_g())
    static_overlap = jaccard(centred_scores.abs(), real.static_scores().unsqueeze(0).abs(), 6).mean()
    assert centred["edited_overlap_static"]["value"] == pytest.approx(static_overlap)  # static-sae's set, uncentred
    gain = centred["alignment"]["value"] - centred["alignment_shuffled_prompts"]["value"]
    assert gain > 0 and centred["agreement"]["ci95"][0] > 0.5  # what remains is prompt-conditional signal
    a, ac = real.matrix(), real.matrix(center=True)
    torch.testing.assert_close(ac, a - torch.outer(real.mean_g(), (real.delta_sum / real.count).float()))
    torch.testing.assert_close(real.mean_g() @ ac, real.mean_g() @ a - (real.mean_g() @ real.mean_g()) *
                               (real.delta_sum / real.count).float(), rtol=1e-4, atol=1e-4)
    kinds = ["a" if i % 4 else "b" for i in range(200)]  # kinds that the map's signal does not depend on
    by_kind, = map_signal(real, held_out, k_prompt=8, k_diff=6, n_boot=100, center=True, kinds=kinds)
    assert set(by_kind["by_kind"]) == {"a", "b"} and by_kind["by_kind"]["b"]["agreement"]["n"] == 50
    assert "by_kind" not in map_signal(real, held_out, k_prompt=8, k_diff=6, n_boot=100, kinds=["a"] * 200)[0]
    old = _map(*data(10, seed=3))
    old.delta_sum = None  # a map fitted before the sums were recorded
    with pytest.raises(ValueError, match="refit it to center"):
        old.matrix(center=True)
