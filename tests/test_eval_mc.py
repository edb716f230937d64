"""Multiple-choice evaluation: loaders, prompts, the two-call scoring engine (shared context, padding,
steering positions) and the peer check against lm-evaluation-harness on the same in-memory model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny, tiny_config

from saealign.data import stratified_subset
from saealign.eval import mc
from saealign.runtime import scoring
from saealign.eval.mc_tasks.lm_eval_peer import lm_eval_aggregate
from saealign.hooks import edit_residual
from saealign.results import read_results
from saealign.stats import mean_estimate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two intra-op threads on the shared 2-core machine run these small forwards up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (ids 20..499), so contexts and continuations split exactly; vocab 512."""

    bos_token = None
    eos_token = "</s>"
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [20 + ord(c) % 480 for c in text]


def naive_ll(model, tokenizer, context: str, continuation: str, steer=None, from_last_context: bool = False) -> float:
    """One full forward of context + continuation[:-1]; optionally steer the continuation positions."""
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        if steer is None:
            logits = model(input_ids=ids).logits
        else:
            layer, fn = steer
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(ctx) - (1 if from_last_context else 0):] = True
            with edit_residual(model, layer, fn, positions=mask):
                logits = model(input_ids=ids).logits
    logp = logits[0, len(ctx) - 1:].log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


REQUESTS = [  # several items with 2-4 choices, different context and continuation lengths, 1-token answers
    ("Question: what is red?\nAnswer:", " apple"), ("Question: what is red?\nAnswer:", " sky at noon"),
    ("Question: what is red?\nAnswer:", "a"),
    ("Hi", " there friend"), ("Hi", " you"),
    ("A much longer context that pads every other row of the batch on the left", "B"),
    ("A much longer context that pads every other row of the batch on the left", "C"),
    ("Winograd prefix Sarah", " got the easier cases."), ("Winograd prefix Maria", " got the easier cases."),
]


class AddVector:
    """A generation-position intervention (like DSPA/CAA): adds `v` at layer 1 of generated positions and
    records the batch size of every call, to check that prefill and continuation calls keep the same rows."""

    system_prompt = None

    def __init__(self, model, scale: float = 3.0):
        torch.manual_seed(1)
        self.v = scale * torch.randn(model.config.hidden_size)
        self.calls: list[tuple[int, bool]] = []

    def fn(self, hidden, ctx):
        self.calls.append((hidden.shape[0], ctx.is_prefill))
        return hidden + self.v

    def apply(self, model, positions="generation"):
        return edit_residual(model, 1, self.fn, positions=positions)


# ---------------------------------------------------------------------------------------------------
# scoring engine
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_engine_matches_one_forward_per_request(arch):
    model, tok = build_tiny(arch), CharTokenizer()
    expected = [naive_ll(model, tok, c, k) for c, k in REQUESTS]
    for batch_size in (3, 64):
        for positions in ("generated", "scored"):
            got = scoring.score_requests(model, tok, REQUESTS, batch_size=batch_size, steer_positions=positions)
            assert got == pytest.approx(expected, abs=1e-4), (batch_size, positions)


def test_engine_truncates_long_contexts_from_the_left():
    model, tok = build_tiny("llama"), CharTokenizer()
    context, continuation = "x" * 40 + "tail of the context", " end"
    got = scoring.score_requests(model, tok, [(context, continuation)], max_length=30)
    keep = 30 + 1 - len(continuation)
    assert got[0] == pytest.approx(naive_ll(model, tok, context[-keep:], continuation), abs=1e-4)
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        scoring.score_requests(model, tok, [("ctx", " " + "y" * 40)], max_length=30)


@pytest.mark.parametrize("positions", ["generated", "scored"])
def test_steering_edits_continuation_positions_like_generation(positions):
    model, tok = build_tiny("llama"), CharTokenizer()
    steer = AddVector(model)
    got = scoring.score_requests(model, tok, REQUESTS, batch_size=4, intervention=steer, steer_positions=positions)
    expected = [naive_ll(model, tok, c, k, steer=(1, steer.fn), from_last_context=positions == "scored")
                for c, k in REQUESTS]
    assert got == pytest.approx(expected, abs=1e-4)
    base = scoring.score_requests(model, tok, REQUESTS, batch_size=4)
    single = [i for i, (_, k) in enumerate(REQUESTS) if len(k) == 1]  # one-token answers
    moved = [abs(got[i] - base[i]) > 1e-3 for i in single]
    # 'generated': the first answer token comes from the unsteered prompt, as in steered generation
    assert not any(moved) if positions == "generated" else all(moved)
    # every continuation call has the rows of the prefill before it (steering state is per prefill row)
    prefill_sizes = [b for b, prefill in steer.calls if prefill]
    later_sizes = [b for b, prefill in steer.calls if not prefill]
    assert later_sizes and set(later_sizes) <= set(prefill_sizes)


def test_encode_moves_trailing_context_whitespace_and_splits_merged_tokens(smol_tokenizer):
    (ctx_ids, cont_ids), = scoring.encode_requests(smol_tokenizer, [("The answer is ", "blue")])
    whole = smol_tokenizer.encode("The answer is blue")
    assert ctx_ids == smol_tokenizer.encode("The answer is") and ctx_ids + cont_ids == whole
    with pytest.raises(ValueError, match="empty context"):
        scoring.encode_requests(smol_tokenizer, [("", " x")])


# ---------------------------------------------------------------------------------------------------
# prompts, metrics, subsets
# ---------------------------------------------------------------------------------------------------
def test_prompt_formats():
    mmlu = mc.build_items("mmlu", [{"question": " What? ", "subject": "high_school_physics", "choices": list("wxyz"),
                                    "answer": 2, "doc_id": "0"}])[0]
    assert mmlu.requests[0] == ("The following are multiple choice questions (with answers) about high school "
                                "physics.\n\nWhat?\nA. w\nB. x\nC. y\nD. z\nAnswer:", " A")
    assert [c for _, c in mmlu.requests] == [" A", " B", " C", " D"] and mmlu.gold == 2
    cloze = mc.build_items("mmlu_continuation", [{"question": "What?", "subject": "anatomy", "choices": list("wxyz"),
                                                 "answer": 1, "doc_id": "0"}])[0]
    assert cloze.requests[1] == ("The following are questions (with answers) about anatomy.\n\nQuestion: What?\nAnswer:", " x")
    wino = mc.build_items("winogrande", [{"qID": "q", "sentence": "Tom beat Al so _ won the  game.", "option1": "Tom",
                                          "option2": "Al", "answer": "2", "doc_id": "q"}])[0]
    assert wino.requests == [("Tom beat Al so Tom", " won the  game."), ("Tom beat Al so Al", " won the  game.")]
    assert wino.gold == 1
    tqa = mc.build_items("truthfulqa_mc2", [{"question": "Why?", "mc1_targets": {"choices": ["a"], "labels": [1]},
                                             "mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 0, 1]},
                                             "doc_id": "0"}])[0]
    assert tqa.requests[0][0].startswith("Q: What is human life expectancy") and tqa.requests[0][0].endswith(
        "Barcelona, Spain.\n\nQ: Why?\nA:")
    assert tqa.labels == [1, 0, 1]
    hs = mc.build_items("hellaswag", [{"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cuts [title] bread.",
                                       "ctx_b": "then he", "endings": ["eats.", "[step] sleeps."], "label": "0",
                                       "doc_id": "1"}])[0]
    # lm-eval strips before removing "[step]", so that ending keeps a leading space
    assert hs.requests == [("Cooking: A man cuts. bread. Then he", " eats."), ("Cooking: A man cuts. bread. Then he", "  sleeps.")]
    steered = mc.build_items("arc_easy", [{"id": "x", "question": "Q?", "answerKey": "2", "doc_id": "x",
                                           "choices": {"text": ["no", "yes"], "label": ["1", "2"]}}], system_prompt="Be good.")[0]
    assert steered.requests[1] == ("Be good.\n\nQuestion: Q?\nAnswer:", " yes") and steered.gold == 1


def test_item_metrics():
    item = mc.MCItem("i", [("c", " a")] * 3, ["a", "bbbbbbbbbb", "cc"], gold=1, labels=[0, 1, 1])
    lls = [-2.0, -3.0, -2.5]
    got = mc.item_metrics("arc_easy", item, lls)
    assert got == {"acc": 0.0, "acc_norm": 1.0}  # -0.3 per character beats -2 and -1.25
    probs = [math.exp(x) for x in lls]
    assert mc.item_metrics("truthfulqa_mc2", item, lls)["mc2"] == pytest.approx((probs[1] + probs[2]) / sum(probs))
    tie = mc.MCItem("t", [("c", " a")] * 2, ["a", "b"], gold=1)
    assert mc.item_metrics("winogrande", tie, [-1.0, -1.0]) == {"acc": 0.0}  # ties go to the first choice


def test_task_estimates_and_paired_deltas():
    values = [1.0, 0.0, 1.0, 1.0]
    m = mean_estimate(values)  # what evaluate_task reports per metric
    se = math.sqrt(sum((v - 0.75) ** 2 for v in values) / 3 / 4)
    assert m.value == 0.75 and m.se == pytest.approx(se) and 0 <= m.ci95[0] < 0.75 < m.ci95[1] <= 1
    base = {"winogrande": [{"id": str(i), "acc": v} for i, v in enumerate(values)]}
    other = {"winogrande": [{"id": str(i), "acc": 1.0} for i in range(4)][::-1]}  # matched by id, not order
    delta = mc.paired_deltas(other, base)["winogrande/acc"]
    assert delta.value == 0.25 and delta.n == 4


def test_stratified_subset_is_proportional_seeded_and_ordered():
    items = [("a", i) for i in range(60)] + [("b", i) for i in range(30)] + [("c", i) for i in range(10)]
    pick = stratified_subset(items, 20, key=lambda x: x[0], seed=3)
    assert len(pick) == 20 and [x[0] for x in pick].count("a") == 12 and [x[0] for x in pick].count("c") == 2
    assert pick == sorted(pick, key=items.index) and pick == stratified_subset(items, 20, key=lambda x: x[0], seed=3)
    assert pick != stratified_subset(items, 20, key=lambda x: x[0], seed=4)


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
COUNTS = {"mmlu": 14042, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "truthfulqa_mc2": 817,
          "winogrande": 1267}


@pytest.mark.parametrize("task", list(COUNTS))
def test_local_release_files_load(shared_data, task, tmp_path):
    docs = mc.load_docs(task, data_dir=shared_data)
    assert len(docs) == COUNTS[task] and len({d["doc_id"] for d in docs}) == len(docs)
    items = mc.build_items(task, docs)
    assert all(0 <= it.gold < len(it.requests) for it in items)
    # the same documents written as HF-schema JSONL load back identically
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in d.items() if k != "doc_id"}) + "\n" for d in docs[:50]))
    again = mc.load_docs(task, source=str(path))
    strip = [{k: v for k, v in d.items() if k != "doc_id"} for d in docs[:50]]
    assert [{k: v for k, v in d.items() if k != "doc_id"} for d in again] == strip


def test_hellaswag_export_keeps_the_query(shared_data):
    import gzip

    raw = [json.loads(line) for line in gzip.open(shared_data / "hellaswag" / "hellaswag_val_full.jsonl.gz", "rt")][:300]
    items = mc.build_items("hellaswag", mc.load_docs("hellaswag", data_dir=shared_data)[:300])
    assert all(it.requests[0][0] == r["query"] for it, r in zip(items, raw) if "[" not in r["query"])
    assert all(it.gold == r["label"] for it, r in zip(items, raw))


def test_hf_sources_use_the_lm_eval_dataset_and_overrides(monkeypatch):
    calls = []
    record = {"qID": "a", "sentence": "x _ y", "option1": "p", "option2": "q", "answer": "1"}
    monkeypatch.setattr(mc, "_read_hf", lambda name, config, split: calls.append((name, config, split)) or [record])
    assert mc.load_docs("winogrande")[0]["doc_id"] == "a"
    mc.load_docs("winogrande", source="hf:me/wino:winogrande_s:train")
    mc.load_docs("winogrande", source="hf:me/wino")
    assert calls == [("allenai/winogrande", "winogrande_xl", "validation"), ("me/wino", "winogrande_s", "train"),
                     ("me/wino", "winogrande_xl", "validation")]


def test_bad_records_name_the_source(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"qID": "a", "sentence": "x _ y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 0 is not a winogrande item"):
        mc.load_docs("winogrande", source=str(path))
    path.write_text('{"qID": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1: invalid JSON"):
        mc.load_docs("winogrande", source=str(path))


# ---------------------------------------------------------------------------------------------------
# peer check: lm-eval's HFLM on the same in-memory model, lm-eval's own task definitions, the same items
# ---------------------------------------------------------------------------------------------------
PEER_TASKS = ["mmlu", "mmlu_continuation", "arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande"]


def tiny_smol_llama(seed: int = 0):
    """A random tiny llama with SmolLM2's vocabulary, so the real tokenizer drives it."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.max_position_embeddings, cfg.pad_token_id = 49152, 2048, 2
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def peer_run(shared_data, smol_tokenizer, tmp_path_factory):
    pytest.importorskip("lm_eval")
    from saealign.eval.mc_tasks.lm_eval_peer import lm_eval_scores

    model = tiny_smol_llama()
    docs = {}
    for task in PEER_TASKS:
        all_docs = mc.load_docs(task, data_dir=shared_data)
        keep = {it.id for it in mc.select_items(mc.build_items(task, all_docs), 20, "stratified", seed=0)}
        docs[task] = [d for d in all_docs if d["doc_id"] in keep]
    ours = {t: mc.evaluate_task(model, smol_tokenizer, t, d, batch_size=16) for t, d in docs.items()}
    reference = lm_eval_scores(model, smol_tokenizer, docs, tmp_path_factory.mktemp("lm_eval"), batch_size=16)
    return docs, ours, reference


@pytest.mark.parametrize("task", PEER_TASKS)
def test_peer_check_against_lm_eval(peer_run, task):
    docs, ours, reference = peer_run
    items = mc.build_items(task, docs[task])
    ref_lls = reference["lls"][task]
    assert len(ours[task]["items"]) == len(ref_lls) == 20
    for item, record, ref in zip(items, ours[task]["items"], ref_lls, strict=True):
        assert record["ll"] == pytest.approx(ref, abs=1e-3), record["id"]
        assert {k: record[k] for k in mc.get_task(task).metrics} == pytest.approx(mc.item_metrics(task, item, ref), abs=1e-4)
    # lm-eval's own aggregates (its process_results, MMLU pooled over subject tasks) within 0.5 points
    for name, value in ours[task]["summary"]["metrics"].items():
        assert abs(value.value - lm_eval_aggregate(reference["results"], task, name)) <= 0.005, name


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def test_cli_eval_mc_writes_results_and_paired_deltas(shared_data, smol_tokenizer, tmp_path):
    from typer.testing import CliRunner

    import saealign.cli.eval_mc_cmd  # noqa: F401  (registers the command)
    from saealign.cli import app

    model_dir = tmp_path / "model"
    tiny_smol_llama().save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    args = ["eval", "mc", "--model", str(model_dir), "--tasks", "arc_easy", "--tasks", "winogrande", "--n", "3",
            "--data", str(shared_data), "--batch-size", "4"]
    first = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    (result,) = read_results(tmp_path / "a" / "results.json")
    assert result.benchmark == "mc" and result.headline == ["arc_easy/acc_norm", "winogrande/acc"]
    assert result.details["tasks"]["arc_easy"]["n"] == 3 and len(result.details["items"]["winogrande"]) == 3
    assert result.config["n"] == 3 and "torch" in result.versions
    second = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "b"), "--baseline", str(tmp_path / "a" / "results.json")])
    assert second.exit_code == 0, second.output
    (steered,) = read_results(tmp_path / "b" / "results.json")
    delta = steered.deltas
    assert delta["arc_easy/acc"].value == 0.0 and delta["winogrande/acc"].n == 3 and steered.baseline == result.method
    bad = CliRunner().invoke(app, ["eval", "mc", "--tasks", "nope"])
    assert bad.exit_code == 2 and "error: " in bad.output and "unknown multiple-choice task" in bad.output
