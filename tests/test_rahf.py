"""RAHF-SCIT: the step-1 and step-2 losses by hand, response alignment across prompts of different lengths,
both steps end to end through the CLI, and exact resume at every point a run can stop."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny
from saealign import rahf as R
from saealign.data import PreferenceTriple

VOCAB = 512
INSTRUCTION_IDS = 300  # the instructions' words get ids from here on, so each has its own token
TEMPLATE = ("{% for m in messages %}{{ 't3 ' + {'system': 't5 ', 'user': 't6 ', 'assistant': 't7 '}[m['role']]"
            " + m['content'] + ' t4 ' }}{% endfor %}{% if add_generation_prompt %}{{ 't3 t7 ' }}{% endif %}")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))


def chat_tokenizer():
    """Word-level: `t{i}` is id i, and every word of the two instructions has an id of its own. (The special
    tokens t0, t1, t2 also match inside words, so data uses ids whose first digit is 3 to 9.)"""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(R.POSITIVE_INSTRUCTION.split() + R.NEGATIVE_INSTRUCTION.split()))
    vocab = {f"t{i}": i for i in range(INSTRUCTION_IDS)} | {w: INSTRUCTION_IDS + i for i, w in enumerate(words)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(WordLevel(vocab, unk_token="t1"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", unk_token="t1", eos_token="t2")
    tok.chat_template = TEMPLATE
    return tok


def triples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"t{i}" for i in torch.randint(30, 100, (length,), generator=g).tolist())

    return [PreferenceTriple([{"role": "user", "content": words(2, 6)}], words(2, 6), words(1, 5)) for _ in range(n)]


# -- losses by hand ------------------------------------------------------------------------------------


def test_scit_loss_by_hand():
    # vocabulary of 4; row 0 (matched) has uniform logits: CE = log 4 on each of its 2 response tokens;
    # row 1 (mismatched) gives its one response token logit log 3 against three zeros: p = 3/6, CE = log 2.
    input_ids = torch.tensor([[0, 1, 2], [0, 3, 0]])
    response_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    logits = torch.zeros(2, 3, 4)
    logits[1, 0, 3] = math.log(3)
    logits[1, 1] = 50.0  # after the response: must not count
    nll = R.mean_response_nll(logits, input_ids, response_mask)
    torch.testing.assert_close(nll, torch.tensor([math.log(4), math.log(2)]))
    losses, q = R.scit_loss(nll[:1], nll[1:], epsilon=0.2)
    # p_match = 1/4, p_mis = 1/2: q_match = 1/3, q_mis = 2/3
    assert q.item() == pytest.approx(1 / 3)
    assert losses.item() == pytest.approx(math.log(4) + 0.8 * -math.log(1 / 3) + 0.2 * -math.log(2 / 3))
    # with eps = 0 and the same NLL under both instructions: NLL + log 2
    losses, q = R.scit_loss(torch.tensor([1.5]), torch.tensor([1.5]), epsilon=0.0)
    assert losses.item() == pytest.approx(1.5 + math.log(2)) and q.item() == pytest.approx(0.5)


def test_alignment_target_and_loss_by_hand():
    h_orig = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # (layers 1, tokens 2, d 2)
    h_pos = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    h_neg = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    target = R.alignment_target(h_orig, h_pos, h_neg, scale=5.0)
    torch.testing.assert_close(target, torch.tensor([[[5.0, -5.0], [1.0, 1.0]]]))
    hidden = torch.tensor([[[8.0, -1.0], [1.0, 1.0]]])  # off by (3, 4) on token 0, exact on token 1
    distances = R.alignment_distances(hidden, target)
    torch.testing.assert_close(distances, torch.tensor([[5.0, 0.0]]))  # unsquared norms
    assert distances.mean().item() == pytest.approx(2.5)
    # per example: tokens 0 and 1 belong to two different rows
    mask = torch.tensor([[0, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(R._mean_per_example(distances.mean(0), mask), torch.tensor([5.0, 0.0]))


def test_response_positions_align_across_prompts_of_different_lengths():
    tok = chat_tokenizer()
    responses = [[50, 51, 52], [60]]
    batches = [R._batch([(prompt, r) for r in responses], tok, torch.device("cpu"))
               for prompt in ([10, 11], [20, 21, 22, 23, 24], [30, 31, 32, 33])]
    for batch in batches:  # hidden state = the input token: what is gathered must be the response tokens
        hidden = {0: batch["input_ids"].float().unsqueeze(-1), 3: -batch["input_ids"].float().unsqueeze(-1)}
        states = R._stacked_response_states(hidden, [0, 3], batch["response_mask"])
        assert states.shape == (2, 4, 1)
        assert states[0, :, 0].tolist() == [50, 51, 52, 60] and states[1, :, 0].tolist() == [-50, -51, -52, -60]


def test_rendering_shares_responses_cuts_them_to_the_longest_prompt_and_drops_what_cannot_fit():
    tok = chat_tokenizer()
    data = [PreferenceTriple([{"role": "user", "content": "t50 t51"}], "t60 t61 t62 t63", "t70"),
            PreferenceTriple([{"role": "user", "content": " ".join(["t52"] * 40)}], "t64", "t71")]
    full, dropped = R.render_instructed(tok, data, max_length=1000)
    t = full[0]
    assert dropped == 0 and t.chosen == [60, 61, 62, 63, 4] and t.rejected == [70, 4]
    assert t.plain_prompt == [3, 6, 50, 51, 4, 3, 7]
    assert t.positive_prompt != t.negative_prompt and len(t.positive_prompt) > len(t.plain_prompt)
    assert t.positive_prompt[:2] == [3, 5] and t.positive_prompt[-7:] == t.plain_prompt  # the system turn comes first
    assert set(t.positive_prompt) - {1} == set(t.positive_prompt)  # every instruction word is a known token
    longest = max(len(t.positive_prompt), len(t.negative_prompt))
    cut, dropped = R.render_instructed(tok, data, max_length=longest + 2)
    assert dropped == 1 and cut[0].chosen == [60, 61] and cut[0].rejected == [70, 4]
    examples = R.contrast_examples(cut)
    assert examples[0] == R.ContrastExample(t.positive_prompt, t.negative_prompt, [60, 61])
    assert examples[1] == R.ContrastExample(t.negative_prompt, t.positive_prompt, [70, 4])
    assert len(R.alignment_examples(cut, "both")) == 2 and len(R.alignment_examples(cut, "chosen")) == 1


# -- training ------------------------------------------------------------------------------------------

FAST = dict(device="cpu", progress=False, target_layers=[1, 2], max_length=64,
            step1_learning_rate=1e-3, step1_warmup_ratio=0.0, step1_num_train_epochs=1,
            step1_per_device_train_batch_size=2, step1_gradient_accumulation_steps=2,
            step2_learning_rate=1e-2, step2_per_device_train_batch_size=2, step2_gradient_accumulation_steps=2)


def run(tmp_path, name, **overrides):
    cfg = R.RAHFConfig(**{**FAST, "output": str(tmp_path / name), **overrides})
    return R.train(cfg, model=build_tiny("llama"), tokenizer=chat_tokenizer(), triples=triples())


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_steps_train_through_the_cli_and_save_a_loadable_changed_model(tmp_path):
    import saealign.cli.rahf_cmd  # noqa: F401  (registers the command)
    from saealign.cli import app
    from saealign.models import load_model

    base = build_tiny("llama")
    base.save_pretrained(tmp_path / "base")
    chat_tokenizer().save_pretrained(tmp_path / "base")
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        for t in triples(10):
            fh.write(json.dumps({"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected}) + "\n")
    out = tmp_path / "rahf"
    (tmp_path / "rahf.json").write_text(json.dumps(FAST))
    result = CliRunner().invoke(app, ["rahf", "train", "--config", str(tmp_path / "rahf.json"), "--model",
                                      str(tmp_path / "base"), "--data", str(tmp_path / "pairs.jsonl"), "--n", "8",
                                      "--output", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["n_triples"] == 8  # the --n draw
    # step 1: 8 triples give 16 examples, 4 per step; step 2: both responses, 16 examples, 4 per step
    step1, step2 = rows(out / "step1" / "metrics.jsonl"), rows(out / "step2" / "metrics.jsonl")
    assert [r["step"] for r in step1] == [1, 2, 3, 4] and [r["step"] for r in step2] == [1, 2, 3, 4]
    assert {"nll", "nll_mismatched", "q_matched", "instruction_accuracy", "time/step_s"} <= set(step1[0])
    assert step2[0]["target_shift_norm"] > 0  # the instructions move the step-1 model's hidden states
    # before the first update the adapter is zero: the distance to h* is exactly the shift a (h_pos - h_neg)
    assert step2[0]["loss"] == pytest.approx(step2[0]["target_shift_norm"], rel=1e-5)
    assert step2[-1]["loss"] < step2[0]["loss"]
    costs = summary["cost_by_stage"]
    assert [c["stage"] for c in costs] == ["rahf-step1-scit", "rahf-step2-align"]
    assert summary["cost"]["flops"]["total"] == pytest.approx(sum(c["flops"]["total"] for c in costs))
    assert all(c["flops"]["backward"] > 0 and c["passes"] > 0 for c in costs)
    assert costs[0]["passes"] == 8 and costs[1]["passes"] == 4 * 8  # step 2: three frozen passes and one with grad
    assert json.loads((out / "training_config.json").read_text())["target_layers"] == [1, 2]

    trained, _ = load_model(str(out), device="cpu")
    base_params = dict(base.named_parameters())
    changed = {name for name, p in trained.named_parameters() if not torch.equal(p, base_params[name])}
    # only the step-2 adapter's modules (q, v) in layers 0..2 differ from the original model
    assert changed == {f"model.layers.{layer}.self_attn.{m}.weight" for layer in range(3) for m in ("q_proj", "v_proj")}
    from transformers import AutoModelForCausalLM

    scit = AutoModelForCausalLM.from_pretrained(out / "step1" / R.STEP1_MODEL)
    assert not torch.equal(scit.model.layers[3].mlp.up_proj.weight, base.model.layers[3].mlp.up_proj.weight)


def assert_same_weights(dir_a, dir_b):
    from transformers import AutoModelForCausalLM

    a = dict(AutoModelForCausalLM.from_pretrained(dir_a).named_parameters())
    for name, p in AutoModelForCausalLM.from_pretrained(dir_b).named_parameters():
        torch.testing.assert_close(p, a[name], rtol=0, atol=1e-6, msg=name)


def test_resume_continues_exactly_in_step_1_and_in_step_2(tmp_path):
    straight = run(tmp_path, "straight", save_steps=2)
    for step in ("step1", "step2"):
        assert (tmp_path / "straight" / step / "checkpoint-2" / "trainer_state.json").exists()

    # stopped in step 1 after its checkpoint: step 1 resumes at step 2, step 2 runs from its start
    (tmp_path / "a" / "step1").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "step1" / "checkpoint-2", tmp_path / "a" / "step1" / "checkpoint-2")
    a = run(tmp_path, "a", save_steps=2, resume_from_checkpoint="latest")
    assert [r["step"] for r in a.step1_metrics] == [3, 4] and [r["step"] for r in a.step2_metrics] == [1, 2, 3, 4]
    for x, y in zip(straight.step1_metrics[2:], a.step1_metrics):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "straight", tmp_path / "a")

    # stopped in step 2: the finished step 1 is skipped, step 2 resumes at step 2
    (tmp_path / "b" / "step2").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "step1", tmp_path / "b" / "step1")
    shutil.copytree(tmp_path / "straight" / "step2" / "checkpoint-2", tmp_path / "b" / "step2" / "checkpoint-2")
    b = run(tmp_path, "b", save_steps=2, resume_from_checkpoint="latest")
    assert b.step1_metrics == [] and [r["step"] for r in b.step2_metrics] == [3, 4]
    for x, y in zip(straight.step2_metrics[2:], b.step2_metrics):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "straight", tmp_path / "b")
    # the summary still reports the whole run's cost: step 1's from its record, step 2's from the checkpoint on
    assert b.summary["cost_by_stage"][0] == straight.summary["cost_by_stage"][0]
    assert b.summary["cost_by_stage"][1]["passes"] == straight.summary["cost_by_stage"][1]["passes"]

    with pytest.raises(ValueError, match="scit_epsilon"):  # a finished step 1 of other settings is not reused
        run(tmp_path, "b", save_steps=2, resume_from_checkpoint="latest", scit_epsilon=0.3)
    with pytest.raises(ValueError, match="step2_learning_rate"):
        run(tmp_path, "b", save_steps=2, resume_from_checkpoint="latest", step2_learning_rate=5e-3)


def test_config_bounds_and_layers():
    with pytest.raises(ValueError, match="scit_epsilon"):
        R.RAHFConfig(scit_epsilon=1.5)
    with pytest.raises(ValueError, match="responses"):
        R.RAHFConfig(responses="rejected")
    with pytest.raises(ValueError, match="target_layers"):
        R.RAHFConfig(target_layers=[])
