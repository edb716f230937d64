"""Judges: the HTTP client against real loopback servers, the local LM and reward-model judges, the cache."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from saealign.eval.judges import (CHAT, HFJudge, Judge, JudgeError, JudgmentCache, OpenAIJudge, RewardModelJudge, build_judge,
                                  label_probs_from_response)
from saealign.serve import OpenAIServer

FIXTURES = Path(__file__).parent / "fixtures" / "judge"
LABELS = ["m", "M"]


def tiny_chat(tokenizer, seed: int = 0, favour_ids: tuple[int, ...] = ()):
    """A tiny random llama over the real SmolLM2 vocabulary (so chat templates and labels are real).

    `favour_ids`: tokens that carry most of the next-token mass (a judge that "answers" with labels).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tokenizer)
    cfg.max_position_embeddings = 4096
    cfg.tie_word_embeddings = not favour_ids
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, 1
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if favour_ids:  # a biased unembedding: these tokens get +12 logits, and prompt-dependent differences
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[list(favour_ids)] = 12.0
            head.weight[list(favour_ids)] = 0.3 * torch.randn(len(favour_ids), cfg.hidden_size)
        model.lm_head = head
    model.config.saealign_model_id = f"tiny-chat-{seed}"
    return model


@pytest.fixture(scope="module")
def label_model(smol_tokenizer):
    ids = [smol_tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    return tiny_chat(smol_tokenizer, seed=1, favour_ids=tuple(ids))


@pytest.fixture(scope="module")
def server(label_model, smol_tokenizer):
    with OpenAIServer(label_model, smol_tokenizer, model_name="tiny-judge", port=0) as srv:
        yield srv


def pair_prompts(n: int = 3):
    return [[{"role": "system", "content": "Answer m or M."},
             {"role": "user", "content": f"Which output is better for question {i}? m: {'yes ' * i} M: no"}]
            for i in range(n)]


def test_http_judge_chat_matches_local_generation(server, label_model, smol_tokenizer, tmp_path):
    convs = pair_prompts()
    remote = OpenAIJudge(server.url, "tiny-judge", cache=tmp_path / "c.sqlite").chat(convs, max_tokens=6, progress=False)
    local = HFJudge(label_model, smol_tokenizer).chat(convs, max_tokens=6, progress=False)
    assert remote == local
    assert all(isinstance(t, str) for t in remote)


def test_http_label_probs_match_local_forward_pass(server, label_model, smol_tokenizer):
    convs = pair_prompts(4)
    remote = OpenAIJudge(server.url, "tiny-judge").label_probs(convs, LABELS, progress=False)
    local = HFJudge(label_model, smol_tokenizer).label_probs(convs, LABELS, progress=False)
    for r, lo in zip(remote, local):
        assert r is not None and set(r) == set(LABELS)
        assert lo["m"] + lo["M"] > 0.5  # the favoured labels carry most of the mass
        for label in LABELS:
            assert r[label] == pytest.approx(lo[label], abs=1e-4)
    assert len({round(lo["m"] / (lo["m"] + lo["M"]), 4) for lo in local}) > 1, "probabilities should vary by prompt"


def test_cache_resumes_without_the_server(label_model, smol_tokenizer, tmp_path):
    convs = pair_prompts(2)
    cache = tmp_path / "judge.sqlite"
    with OpenAIServer(label_model, smol_tokenizer, model_name="tiny-judge", port=0) as srv:
        url = srv.url
        first = OpenAIJudge(url, "tiny-judge", cache=cache).chat(convs, max_tokens=4, progress=False)
    # The server is gone: everything must come from the disk cache (a new judge object, as after a restart).
    again = OpenAIJudge(url, "tiny-judge", cache=cache, max_retries=0, timeout_s=2).chat(convs, max_tokens=4,
                                                                                         progress=False)
    assert again == first
    assert len(JudgmentCache(cache)) == 2
    # A different decoding budget is a different key, so it is not served from the cache.
    other = OpenAIJudge(url, "tiny-judge", cache=cache, max_retries=0, timeout_s=2, backoff_s=0.01)
    assert other.chat(convs[:1], max_tokens=5, progress=False) == [None]


class _Recorded(BaseHTTPRequestHandler):
    """Replays recorded responses: the first `fail` requests get 503 (or `status`), then `body`."""

    def do_POST(self):
        srv = self.server
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with srv.lock:
            srv.calls += 1
            failing = srv.calls <= srv.fail
        status, body = (srv.status, {"error": {"message": "busy"}}) if failing else (200, srv.body)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorded_server():
    servers = []

    def start(body, fail=0, status=503):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorded)
        srv.body, srv.fail, srv.status, srv.calls, srv.lock = body, fail, status, 0, threading.Lock()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _recorded(name):
    return next(r for r in json.loads((FIXTURES / "chat_responses.json").read_text()) if r["name"] == name)


def test_http_retries_transient_errors_with_backoff(recorded_server):
    srv, url = recorded_server(_recorded("openai_clean_logprobs")["response"], fail=2)
    judge = OpenAIJudge(url, "gpt-4-1106-preview", max_retries=3, backoff_s=0.01)
    probs = judge.label_probs(pair_prompts(1), LABELS, progress=False)
    assert srv.calls == 3
    assert probs[0]["m"] == pytest.approx(0.8187, abs=1e-4)


def test_http_gives_up_after_retries_and_fails_fast_on_client_errors(recorded_server):
    srv, url = recorded_server({}, fail=100)
    start = time.perf_counter()
    assert OpenAIJudge(url, "x", max_retries=2, backoff_s=0.01).chat(pair_prompts(1), progress=False) == [None]
    assert srv.calls == 3 and time.perf_counter() - start < 5
    srv, url = recorded_server({}, fail=100, status=401)
    with pytest.raises(JudgeError, match="HTTP 401"):
        OpenAIJudge(url, "x", max_retries=5, backoff_s=0.01).chat(pair_prompts(1), progress=False)
    assert srv.calls == 1


def test_http_rejects_wrong_model_name(server):
    with pytest.raises(JudgeError, match="HTTP 404"):
        OpenAIJudge(server.url, "gpt-4").chat(pair_prompts(1), progress=False)


@pytest.mark.parametrize("record", json.loads((FIXTURES / "chat_responses.json").read_text()), ids=lambda r: r["name"])
def test_label_probs_from_recorded_responses(record):
    got = label_probs_from_response(record["response"], record["labels"])
    if record["expected"] is None:
        assert got is None
    else:
        assert got == pytest.approx(record["expected"], abs=1e-6)


def test_recorded_responses_through_the_http_client(recorded_server):
    record = _recorded("vllm_spaced_tokens_summed")
    _, url = recorded_server(record["response"])
    got = OpenAIJudge(url, "m").label_probs(pair_prompts(1), LABELS, progress=False)[0]
    assert got == pytest.approx(record["expected"], abs=1e-6)


def test_label_probs_batched_equals_single(label_model, smol_tokenizer):
    convs = pair_prompts(3)
    batched = HFJudge(label_model, smol_tokenizer, batch_size=3).label_probs(convs, LABELS, progress=False)
    single = [HFJudge(label_model, smol_tokenizer, batch_size=1).label_probs([c], LABELS, progress=False)[0] for c in convs]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, rel=1e-4)


def test_multi_token_label_is_refused(label_model, smol_tokenizer):
    with pytest.raises(JudgeError, match="single-token"):
        HFJudge(label_model, smol_tokenizer).label_probs(pair_prompts(1), ["Assistant A", "Assistant B"], progress=False)


def test_capabilities_are_checked(label_model, smol_tokenizer):
    with pytest.raises(JudgeError, match="cannot do 'reward'"):
        HFJudge(label_model, smol_tokenizer).reward([[{"role": "user", "content": "x"}]])


@pytest.fixture(scope="module")
def reward_model_dir(smol_tokenizer, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.num_labels, cfg.pad_token_id = len(smol_tokenizer), 1, smol_tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_reward_model_judge(reward_model_dir, tmp_path):
    convs = [[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": answer}]
             for answer in ("Paris.", "The capital of France is Paris.", "Berlin")]
    judge = RewardModelJudge(reward_model_dir, cache=tmp_path / "rm.sqlite")
    rewards = judge.reward(convs, progress=False)
    assert all(isinstance(r, float) for r in rewards) and len(set(rewards)) == 3
    assert RewardModelJudge(reward_model_dir, cache=tmp_path / "rm.sqlite").reward(convs[::-1], progress=False) == rewards[::-1]
    with pytest.raises(ValueError, match="end with the assistant"):
        RewardModelJudge(reward_model_dir).reward([convs[0][:1]], progress=False)


def test_cache_is_shared_between_threads(tmp_path):
    cache = JudgmentCache(tmp_path / "t.sqlite")

    def work(k):
        for i in range(20):
            cache.put(JudgmentCache.key("j", "chat", [k, i]), {"v": i})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 80
    assert JudgmentCache(tmp_path / "t.sqlite").get(JudgmentCache.key("j", "chat", [2, 7])) == {"v": 7}


def test_build_judge_specs(label_model, smol_tokenizer):
    judge = build_judge("self", policy=(label_model, smol_tokenizer))
    assert isinstance(judge, HFJudge) and judge.name == "tiny-chat-1"
    assert build_judge("hf:tiny-chat-1", policy=(label_model, smol_tokenizer)).model is label_model  # shared
    judge = build_judge("openai:gpt-4o", base_url="http://127.0.0.1:9/v1")
    assert isinstance(judge, OpenAIJudge) and judge.name == "gpt-4o"
    for bad in ("openai:gpt-4o", "nonsense", "hf:"):
        with pytest.raises(ValueError):
            build_judge(bad)


class _Interrupted(Judge):
    """Answers the first chunk, then dies: what a crash or Ctrl-C halfway through a run looks like."""

    capabilities = frozenset({"chat"})
    chunk_size = 2

    def __init__(self, cache):
        super().__init__("interrupted", cache)
        self.calls = 0

    def _chat(self, conversations, max_tokens):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        return [f"[[{len(c[-1]['content'])}]]" for c in conversations]


def test_finished_chunks_are_cached_before_an_interruption(tmp_path):
    convs = pair_prompts(5)
    with pytest.raises(KeyboardInterrupt):
        _Interrupted(tmp_path / "i.sqlite").chat(convs, progress=False)
    resumed = _Interrupted(tmp_path / "i.sqlite")
    resumed.calls = -10  # would not fail again
    out = resumed.chat(convs, progress=False)
    assert resumed.calls == -10 + 2  # only the three unfinished prompts (two chunks) were asked again
    assert out == [f"[[{len(c[-1]['content'])}]]" for c in convs]


class Replay(Judge):
    """Replays recorded judgment texts: the n-th call to the judge answers with `script[n]` per prompt."""

    capabilities = frozenset({CHAT})

    def __init__(self, script):
        super().__init__("replay")
        self.script, self.calls = script, []

    def _chat(self, conversations, max_tokens):
        self.calls.append(conversations)
        texts = self.script[len(self.calls) - 1]
        return [texts[i % len(texts)] for i in range(len(conversations))]
