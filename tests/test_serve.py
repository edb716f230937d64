"""The shared generation helper and the OpenAI-compatible server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from saealign.eval.generation import Sampling, generate, generate_chat, render_chat
from saealign.hooks import edit_residual
from saealign.serve import OpenAIServer, ServeConfig, build_server
from test_judges import tiny_chat

CONVS = [[{"role": "user", "content": "Hello there"}],
         [{"role": "user", "content": "A much longer question about the history of tea in several countries"}],
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return tiny_chat(smol_tokenizer, seed=2)


class Shift:
    """A test intervention: adds a large vector to the last layer's residual stream at generated positions."""

    def __init__(self, vector, system_prompt=None):
        self.vector, self.system_prompt, self.entered, self.edited = vector, system_prompt, 0, 0

    def _shift(self, h, ctx):
        self.edited += int(ctx.mask.sum())  # positions this call edits (generated tokens)
        return h + self.vector

    @contextmanager
    def apply(self, model, positions="generation"):
        self.entered += 1
        with edit_residual(model, model.config.num_hidden_layers - 1, self._shift, positions=positions):
            yield


def _prompts(tok):
    return [render_chat(tok, c) for c in CONVS]


def test_batched_greedy_equals_one_by_one(model, smol_tokenizer):
    sampling = Sampling(max_new_tokens=6)
    batched = generate(model, smol_tokenizer, _prompts(smol_tokenizer), sampling, batch_size=3, progress=False)
    single = [generate(model, smol_tokenizer, [p], sampling, batch_size=1, progress=False)[0]
              for p in _prompts(smol_tokenizer)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.prompt_tokens for g in batched] == [len(smol_tokenizer(p, add_special_tokens=False)["input_ids"])
                                                   for p in _prompts(smol_tokenizer)]


def test_sampling_is_seeded(model, smol_tokenizer):
    sampling = Sampling(temperature=1.0, max_new_tokens=8)
    a = generate(model, smol_tokenizer, _prompts(smol_tokenizer), sampling, seed=5, progress=False)
    b = generate(model, smol_tokenizer, _prompts(smol_tokenizer), sampling, seed=5, progress=False)
    c = generate(model, smol_tokenizer, _prompts(smol_tokenizer), sampling, seed=6, progress=False)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_logprobs_are_the_raw_distribution(model, smol_tokenizer):
    prompt = _prompts(smol_tokenizer)[:1]
    g = generate(model, smol_tokenizer, prompt, Sampling(max_new_tokens=3), top_logprobs=4, progress=False)[0]
    ids = torch.tensor([smol_tokenizer(prompt[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        first = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
    assert g.logprobs[0].token_id == int(first.argmax())  # greedy picks the top token
    assert g.logprobs[0].logprob == pytest.approx(float(first.max()), abs=1e-4)
    assert [i for i, _ in g.logprobs[0].top] == first.topk(4).indices.tolist()


def test_intervention_is_applied_and_system_prompt_rendered(model, smol_tokenizer):
    base = generate_chat(model, smol_tokenizer, CONVS, Sampling(max_new_tokens=6), progress=False)
    shift = Shift(torch.randn(model.config.hidden_size) * 50)
    steered = generate_chat(model, smol_tokenizer, CONVS, Sampling(max_new_tokens=6), intervention=shift, progress=False)
    assert shift.entered == 1 and steered != base
    assert shift.edited == 5 * len(CONVS)  # every fed-back generated token of every row, none of the prompt
    # the hooks are gone afterwards
    assert generate_chat(model, smol_tokenizer, CONVS, Sampling(max_new_tokens=6), progress=False) == base
    prompt = render_chat(smol_tokenizer, CONVS[0], "Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt and "SmolLM" not in prompt


def _post(url, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(model, smol_tokenizer):
    with OpenAIServer(model, smol_tokenizer, model_name="tiny", port=0) as srv:
        yield srv


def test_models_and_health(server):
    assert server.host == "127.0.0.1"
    assert [m["id"] for m in _get(server.url + "/models")["data"]] == ["tiny"]
    assert _get(server.url + "/models/tiny")["id"] == "tiny"
    assert _get(server.url.removesuffix("/v1") + "/health") == {"status": "ok"}


def test_chat_completion_equals_direct_generation(server, model, smol_tokenizer):
    status, body = _post(server.url + "/chat/completions",
                         {"model": "tiny", "messages": CONVS[2], "temperature": 0, "max_tokens": 6})
    assert status == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    direct = generate_chat(model, smol_tokenizer, [CONVS[2]], Sampling(max_new_tokens=6), progress=False)[0]
    assert choice["message"]["content"] == direct
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 5


def test_chat_n_logprobs_and_stop(server, smol_tokenizer):
    status, body = _post(server.url + "/chat/completions",
                         {"messages": CONVS[0], "temperature": 1.0, "max_tokens": 5, "n": 3, "seed": 1,
                          "logprobs": True, "top_logprobs": 3})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
    tops = [t["logprob"] for t in entry["top_logprobs"]]
    assert tops == sorted(tops, reverse=True) and entry["bytes"] == list(entry["token"].encode())
    text = body["choices"][0]["message"]["content"]
    assert len(text) > 3
    stop = text[1:3]  # the same seed gives the same samples, now cut before the first `stop`
    _, cut = _post(server.url + "/chat/completions",
                   {"messages": CONVS[0], "temperature": 1.0, "max_tokens": 5, "n": 3, "seed": 1, "stop": [stop]})
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_completions_route(server):
    status, body = _post(server.url + "/completions", {"prompt": ["Once upon", "The tea"], "max_tokens": 3,
                                                        "temperature": 0, "logprobs": 2})
    assert status == 200 and body["object"] == "text_completion" and len(body["choices"]) == 2
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])


@pytest.mark.parametrize("body,status,param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": CONVS[0], "temperature": 3}, 400, "temperature"),
    ({"messages": CONVS[0], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CONVS[0], "stream": True}, 400, "stream"),
    ({"messages": CONVS[0], "model": "gpt-4"}, 404, "model"),
])
def test_request_errors(server, body, status, param):
    got, payload = _post(server.url + "/chat/completions", body)
    assert got == status and payload["error"]["param"] == param and payload["error"]["message"]


def test_unknown_route_and_bad_json(server):
    assert _post(server.url + "/embeddings", {})[0] == 404
    req = urllib.request.Request(server.url + "/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400


def test_concurrent_requests_are_serialised(server):
    results = []

    def call(i):
        results.append(_post(server.url + "/chat/completions", {"messages": CONVS[i % 3], "temperature": 0,
                                                                 "max_tokens": 4}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all(status == 200 for status, _ in results)


def test_api_key_and_steered_server(model, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("TEST_SERVE_KEY", "sekret")
    shift = Shift(torch.randn(model.config.hidden_size) * 50, system_prompt="Be brief.")
    cfg = ServeConfig(port=0, api_key_env="TEST_SERVE_KEY", name="steered")
    with build_server(cfg, model=model, tokenizer=smol_tokenizer, intervention=shift) as srv:
        body = {"messages": CONVS[0], "temperature": 0, "max_tokens": 5}
        assert _post(srv.url + "/chat/completions", body)[0] == 401
        status, out = _post(srv.url + "/chat/completions", body, key="sekret")
        assert status == 200 and out["model"] == "steered" and shift.entered == 1
        # 5 new tokens: the 4 fed back through the model are edited (the first comes from the prompt)
        assert shift.edited == 4, "the server's requests were not steered"
        direct = generate_chat(model, smol_tokenizer, CONVS[:1], Sampling(max_new_tokens=5), intervention=shift,
                               progress=False)[0]
        assert out["choices"][0]["message"]["content"] == direct
        plain = len(smol_tokenizer(render_chat(smol_tokenizer, CONVS[0]), add_special_tokens=False)["input_ids"])
        assert out["usage"]["prompt_tokens"] != plain  # the system prompt replaced the default one


def test_build_server_requires_the_key_variable(model, smol_tokenizer, monkeypatch):
    monkeypatch.delenv("TEST_SERVE_MISSING", raising=False)
    with pytest.raises(ValueError, match="not set"):
        build_server(ServeConfig(port=0, api_key_env="TEST_SERVE_MISSING"), model=model, tokenizer=smol_tokenizer)


def test_serve_cli_is_registered():
    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import serve_cmd  # noqa: F401

    out = CliRunner().invoke(app, ["serve", "--help"])
    assert out.exit_code == 0 and "--port" in out.output and "--intervention" in out.output


@pytest.mark.integration
def test_default_model_behind_the_server_judges_over_http():
    from saealign.eval.judges import OpenAIJudge
    from saealign.models import load_model

    model, tok = load_model()
    with OpenAIServer(model, tok, model_name="smollm2", port=0) as srv:
        texts = OpenAIJudge(srv.url, "smollm2").chat([[{"role": "user", "content": "What is 2+2?"}]], max_tokens=12,
                                                      progress=False)
        probs = OpenAIJudge(srv.url, "smollm2").label_probs(
            [[{"role": "user", "content": "Reply with one letter, m or M."}]], ["m", "M"], progress=False)
    assert texts[0] and "4" in texts[0]
    assert probs[0] is not None and probs[0]["m"] + probs[0]["M"] > 0


def test_server_with_a_method_spec(model, smol_tokenizer):
    cfg = ServeConfig(port=0, intervention="prompt-prefix:Answer in French.")
    with build_server(cfg, model=model, tokenizer=smol_tokenizer) as srv:
        assert srv.model_name == "tiny-chat-2+prompt-prefix" and srv.intervention.system_prompt == "Answer in French."
        status, out = _post(srv.url + "/chat/completions", {"messages": CONVS[0], "temperature": 0, "max_tokens": 3})
    prompt = render_chat(smol_tokenizer, CONVS[0], "Answer in French.")
    assert status == 200
    assert out["usage"]["prompt_tokens"] == len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
