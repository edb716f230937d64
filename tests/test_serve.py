"""The shared generation helper and the OpenAI-compatible server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from saealign.runtime.generation import Sampling, generate, generate_chat, render_chat
from saealign.hooks import edit_residual
from saealign.serve import OpenAIServer, ServeConfig, build_server
from conftest import char_triples
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


# ---------------------------------------------------------------------------------------------- the server

METHOD_SPECS = ("base", "dspa", "dspa-strong", "repe", "prefix")


@pytest.fixture(scope="module")
def methods(model, smol_tokenizer):
    """A DSPA map fitted on the tiny chat model (tiny SAEs at layers 1 and 2), a RepE vector, a prompt prefix."""
    from saealign.dspa import DSPA, SteerConfig, fit_map
    from saealign.dspa.baselines import PromptPrefix, RepE
    from saealign.dspa.map import FitOptions
    from test_dspa import _tiny_saes

    sae_in, sae_out = _tiny_saes(d=model.config.hidden_size)
    dspa_map = fit_map(model, smol_tokenizer, sae_in, sae_out, char_triples(12), FitOptions(batch_size=4), progress=False)
    torch.manual_seed(0)
    return {"dspa": DSPA(dspa_map, sae_in, sae_out, SteerConfig(alpha=0.5, k_prompt=16, k_diff=12)),
            "dspa-strong": DSPA(dspa_map, sae_in, sae_out, SteerConfig(alpha=3.0, k_prompt=16, k_diff=20, mode="both")),
            "repe": RepE(torch.randn(model.config.hidden_size) * 4, layer=2, coef=1.0),
            "prefix": PromptPrefix("Answer in French.")}


@pytest.fixture(scope="module")
def server(model, smol_tokenizer, methods):
    with OpenAIServer(model, smol_tokenizer, model_name="tiny", port=0, methods=methods, max_batch=16) as srv:
        yield srv


def _post(url, body, key=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.post(url, json=body, headers=headers, timeout=timeout)
    return resp.status_code, resp.json()


def _get(url):
    return httpx.get(url, timeout=10).json()


def _chat(server, conv, model="tiny", max_tokens=6, **extra):
    status, body = _post(server.url + "/chat/completions", {"model": model, "messages": conv, "temperature": 0,
                                                             "max_tokens": max_tokens, **extra})
    assert status == 200, body
    return body


def _wait_idle(server, seconds=10.0):
    deadline = time.monotonic() + seconds
    while (server.engine.running or server.engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not (server.engine.running or server.engine.queue_depth)


def test_models_health_and_metrics(server):
    assert server.host == "127.0.0.1"
    assert {m["id"] for m in _get(server.url + "/models")["data"]} == {"tiny", *METHOD_SPECS}
    assert _get(server.url + "/models/dspa")["saealign"]["method"] == "dspa"
    root = server.url.removesuffix("/v1")
    assert _get(root + "/health")["status"] == "ok"
    metrics = _get(root + "/metrics")
    assert {"queue_depth", "running_rows", "tokens_per_second", "generated_tokens", "requests"} <= set(metrics)


def test_chat_completion_equals_direct_generation(server, model, smol_tokenizer):
    body = _chat(server, CONVS[2])
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
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


LONG = "tea " * 5000  # > 4096 tokens, the tiny model's context length


@pytest.mark.parametrize("route,body,status,param", [
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"messages": CONVS[0], "temperature": 3}, 400, "temperature"),
    ("chat/completions", {"messages": CONVS[0], "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": CONVS[0], "max_tokens": 5000}, 400, "max_tokens"),  # over the server's limit
    ("chat/completions", {"messages": CONVS[0], "model": "gpt-4"}, 404, "model"),  # unknown model / method
    ("chat/completions", {"messages": CONVS[0], "intervention": "dspa"}, 400, "intervention"),
    ("chat/completions", {"messages": CONVS[0], "model": "dspa", "steering": {"alpha": -1}}, 400, "steering.alpha"),
    ("chat/completions", {"messages": CONVS[0], "model": "dspa", "steering": {"mode": "x"}}, 400, "steering.mode"),
    ("chat/completions", {"messages": CONVS[0], "model": "dspa", "steering": {"threshold": 1}}, 400,
     "steering.threshold"),
    ("chat/completions", {"messages": CONVS[0], "model": "base", "steering": {"alpha": 1}}, 400, "steering.alpha"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),  # over-long: no cut
    ("completions", {"prompt": LONG}, 400, "prompt"),
    ("completions", {"prompt": "Once upon a time", "max_tokens": 4096}, 400, "max_tokens"),  # prompt + max_tokens > context
    ("completions", {"prompt": ""}, 400, "prompt"),  # empty prompt: was a 500
    ("completions", {"prompt": ["a", ""]}, 400, "prompt"),
])
def test_request_errors(server, route, body, status, param):
    got, payload = _post(f"{server.url}/{route}", body)
    assert got == status and payload["error"]["param"] == param and payload["error"]["message"]
    if param in ("messages", "prompt") and "tea" in str(body):
        assert payload["error"]["code"] == "context_length_exceeded" and "4096" in payload["error"]["message"]
    assert _wait_idle(server), "a refused request left rows behind"


def test_unknown_route_and_bad_json(server):
    assert _post(server.url + "/embeddings", {})[0] == 404
    resp = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["message"]


def test_mixed_concurrent_requests_equal_one_at_a_time(server):
    """Requests with different methods (and settings) decoded in shared batches give what each gives alone."""
    requests = [(conv, method, steering) for conv in CONVS for method in METHOD_SPECS
                for steering in ([None, {"alpha": 1.5, "k_diff": 4}] if method.startswith("dspa") else [None])]
    alone = []
    for conv, method, steering in requests:
        alone.append(_chat(server, conv, method, max_tokens=8, **({"steering": steering} if steering else {})))
    together: dict[int, dict] = {}

    def call(i):
        conv, method, steering = requests[i]
        together[i] = _chat(server, conv, method, max_tokens=8, **({"steering": steering} if steering else {}))

    steps_before = server.engine.stats["steps"]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(together) == len(requests)
    assert server.engine.stats["steps"] - steps_before < 8 * len(requests) / 2, "the requests were not batched"
    for i, (conv, method, steering) in enumerate(requests):
        assert together[i]["choices"][0]["message"]["content"] == alone[i]["choices"][0]["message"]["content"], \
            (method, steering)
        assert together[i]["saealign"]["edited_tokens"] == alone[i]["saealign"]["edited_tokens"], (method, steering)
    edited = {(m, json.dumps(s)): alone[i]["saealign"]["edited_tokens"][0] for i, (_, m, s) in enumerate(requests)}
    assert edited[("base", "null")] == 0 and edited[("prefix", "null")] == 0
    assert edited[("dspa-strong", "null")] > 0
    outputs = {m: [alone[i]["choices"][0]["message"]["content"] for i, (_, mm, s) in enumerate(requests)
                   if mm == m and s is None] for m in METHOD_SPECS}
    assert outputs["dspa-strong"] != outputs["base"] and outputs["repe"] != outputs["base"]


def test_engine_edits_every_decoded_token_where_the_rule_says(server, model, smol_tokenizer, methods):
    """In one shared batch: a RepE row is edited at every fed-back token, a DSPA row exactly where DSPA alone
    (the classic `generate` path) edits, a base row nowhere."""
    from saealign.runtime.generation import BatchEngine, DecodeRow
    from saealign.steering import row_steering

    engine = BatchEngine(model, smol_tokenizer)
    sampling = Sampling(max_new_tokens=7)
    prompts = [smol_tokenizer(render_chat(smol_tokenizer, c), add_special_tokens=False)["input_ids"] for c in CONVS]
    rows = {(name, i): DecodeRow(p, sampling, steering=row_steering(methods.get(name)))
            for name in ("base", "dspa-strong", "repe") for i, p in enumerate(prompts)}
    engine.step(list(rows.values()))
    while engine.running:
        engine.step()
    for i, prompt in enumerate(render_chat(smol_tokenizer, c) for c in CONVS):
        assert rows[("base", i)].edited_tokens == 0
        assert rows[("repe", i)].edited_tokens == len(rows[("repe", i)].token_ids) - 1  # the first comes from prefill
        dspa = methods["dspa-strong"]
        before = dspa.edited_tokens
        alone = generate(model, smol_tokenizer, [prompt], sampling, intervention=dspa, progress=False)[0]
        assert rows[("dspa-strong", i)].token_ids == alone.token_ids
        assert rows[("dspa-strong", i)].edited_tokens == dspa.edited_tokens - before > 0


def test_no_state_leaks_between_requests(server, methods):
    """A request's own alpha lives in its rows: the method, and the next request naming it, keep the defaults."""
    default = _chat(server, CONVS[1], "dspa-strong", max_tokens=8)
    strong = _chat(server, CONVS[1], "dspa-strong", max_tokens=8, steering={"alpha": 0.0})
    again = _chat(server, CONVS[1], "dspa-strong", max_tokens=8)
    assert strong["saealign"]["edited_tokens"] == [0] and default["saealign"]["edited_tokens"][0] > 0
    assert again["choices"] == default["choices"] and again["saealign"] == default["saealign"]
    assert methods["dspa-strong"].cfg.alpha == 3.0
    assert _wait_idle(server) and not server.engine._states, "steering state outlived its rows"


def _sse(resp) -> list[dict]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_equals_the_whole_answer(server):
    whole = _chat(server, CONVS[1], "repe", max_tokens=10)
    body = {"model": "repe", "messages": CONVS[1], "temperature": 0, "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(resp)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]
    body = {"prompt": "Once upon", "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as resp:
        text = "".join(c["choices"][0]["text"] for c in _sse(resp))
    assert text == _post(server.url + "/completions", {**body, "stream": False})[1]["choices"][0]["text"]


def test_stream_chat_client(server):
    from saealign.serve import stream_chat

    body = {"model": "dspa", "messages": CONVS[0], "temperature": 0, "max_tokens": 8, "steering": {"alpha": 1.0}}
    whole = _chat(server, CONVS[0], "dspa", max_tokens=8, steering={"alpha": 1.0})
    assert "".join(stream_chat(server.url, body)) == whole["choices"][0]["message"]["content"]
    with pytest.raises(ValueError, match="not found"):
        list(stream_chat(server.url, {**body, "model": "nope"}))


def test_chat_cli_talks_to_the_server(server):
    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import dspa_cmd  # noqa: F401

    args = ["chat", "--url", server.url, "--method", "dspa", "--alpha", "1.0", "--max-new-tokens", "8", "--compare"]
    out = CliRunner().invoke(app, args, input="Hello there\n\n")
    assert out.exit_code == 0, out.output
    whole = _chat(server, CONVS[0], "dspa", max_tokens=8, steering={"alpha": 1.0})["choices"][0]["message"]["content"]
    base = _chat(server, CONVS[0], "base", max_tokens=8)["choices"][0]["message"]["content"]
    printed = out.output.replace("\n", "")
    assert f"dspa> {whole}" in printed and f"base> {base}" in printed
    out = CliRunner().invoke(app, [*args, "--threshold", "0.1"], input="Hello\n\n")
    assert out.exit_code == 2 and "--threshold" in out.output


def test_disconnect_cancels_generation(server):
    cancelled = server.engine.stats["finished"]["cancelled"]
    body = {"messages": CONVS[0], "temperature": 0, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as resp:
        next(resp.iter_lines())  # generation has started; now walk away
    assert _wait_idle(server), "an abandoned stream kept generating"
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(server.url + "/chat/completions", json={**body, "stream": False}, timeout=1.0)
    assert _wait_idle(server), "an abandoned request kept generating"
    assert server.engine.stats["finished"]["cancelled"] == cancelled + 2


def test_a_long_request_does_not_hold_up_others(model, smol_tokenizer):
    """A 3,000-token request (with log-probabilities) shares the batch: a short one arriving later joins at the
    next step and is answered while the long one runs; a cancelled row leaves at the next step."""
    from saealign.runtime.generation import BatchEngine, DecodeRow

    engine = BatchEngine(model, smol_tokenizer)
    prompts = [smol_tokenizer(render_chat(smol_tokenizer, c), add_special_tokens=False)["input_ids"] for c in CONVS]
    long = DecodeRow(prompts[0], Sampling(max_new_tokens=3000), top_logprobs=5)
    engine.step([long])
    engine.step()
    short = DecodeRow(prompts[1], Sampling(max_new_tokens=4))
    engine.step([short])
    while not short.done:
        engine.step()
    assert short.finish_reason in ("stop", "length") and not long.done and engine.running == 1
    assert len(long.token_ids) < 10 and len(long.logprobs) == len(long.token_ids)
    long.cancelled = True
    engine.step()
    assert long.finish_reason == "cancelled" and engine.running == 0


def test_queue_limit_and_timeout(model, smol_tokenizer):
    with OpenAIServer(model, smol_tokenizer, model_name="tiny", port=0, max_queue=2, request_timeout_s=0.3) as srv:
        status, body = _post(srv.url + "/chat/completions", {"messages": CONVS[0], "n": 3})
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        status, body = _post(srv.url + "/chat/completions", {"messages": CONVS[0], "max_tokens": 3000})
        assert status == 504 and "timeout" in body["error"]["message"]
        assert srv.metrics()["requests"]["rejected"] == 1


def test_admin_registers_methods(server, tmp_path):
    url = server.url.removesuffix("/v1") + "/admin/methods"
    status, card = _post(url, {"name": "french", "spec": "prompt-prefix:Réponds en français."})
    assert status == 200 and card["id"] == "french"
    prompt = render_chat(server.tokenizer, CONVS[0], "Réponds en français.")
    want = len(server.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert _chat(server, CONVS[0], "french")["usage"]["prompt_tokens"] == want
    assert _post(url, {"name": "french", "spec": "base"})[0] == 409
    assert _post(url, {"name": "x", "spec": "nonsense:1"})[1]["error"]["param"] == "spec"
    assert _post(url, {"name": "x", "spec": "base", "options": {"alpha": 1}})[1]["error"]["param"] == "options.alpha"
    assert httpx.delete(url + "/french", timeout=10).status_code == 200
    assert _post(server.url + "/chat/completions", {"model": "french", "messages": CONVS[0]})[0] == 404


def test_api_key_and_steered_default(model, smol_tokenizer, methods, monkeypatch):
    monkeypatch.setenv("TEST_SERVE_KEY", "sekret")
    cfg = ServeConfig(port=0, api_key_env="TEST_SERVE_KEY", name="steered")
    repe = methods["repe"]
    with build_server(cfg, model=model, tokenizer=smol_tokenizer, intervention=repe) as srv:
        body = {"messages": CONVS[0], "temperature": 0, "max_tokens": 5}
        assert _post(srv.url + "/chat/completions", body)[0] == 401
        assert _post(srv.url.removesuffix("/v1") + "/admin/methods", {"name": "a", "spec": "base"})[0] == 401
        status, out = _post(srv.url + "/chat/completions", body, key="sekret")
        assert status == 200 and out["model"] == "steered"
        assert out["saealign"]["edited_tokens"] == [4], "the server's requests were not steered"
        direct = generate_chat(model, smol_tokenizer, CONVS[:1], Sampling(max_new_tokens=5), intervention=repe,
                               progress=False)[0]
        assert out["choices"][0]["message"]["content"] == direct
        status, base = _post(srv.url + "/chat/completions", {**body, "model": "base"}, key="sekret")
        assert base["saealign"]["edited_tokens"] == [0]  # the base model is served beside the steered one


def test_an_intervention_without_a_per_row_form_is_refused(model, smol_tokenizer):
    class Opaque:
        name, system_prompt = "opaque", None

        def apply(self, model, positions="generation"):
            return edit_residual(model, 0, lambda h, ctx: h, positions)

    with pytest.raises(ValueError, match="per-row form"):
        OpenAIServer(model, smol_tokenizer, model_name="x", intervention=Opaque(), port=0)


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
    assert "--methods" in out.output and "--max-queue" in out.output


def test_edit_step_is_one_graph_and_counts_without_sync(methods):
    """The steering step traces as one graph (no host sync, no data-dependent branch) and keeps its bits."""
    from saealign.dspa.steer import steer_hidden

    dspa = methods["dspa-strong"]
    sae = dspa.sae_out
    hidden = torch.randn(3, 1, sae.d_in) * 5
    minus = sae.encode(hidden[:, 0]) > 0  # every active latent selected: rows 0 and 1 must change
    minus[2] = False  # a base row: empty sets
    plus = torch.zeros_like(minus)
    alpha = torch.tensor([[0.5], [2.0], [0.0]])
    edit = torch.ones(3, 1, dtype=torch.bool)
    compiled = torch.compile(steer_hidden, backend="eager", fullgraph=True)
    out, changed = compiled(sae, hidden, edit, minus, plus, alpha)
    want, want_changed = steer_hidden(sae, hidden, edit, minus, plus, alpha)
    assert torch.equal(out, want) and torch.equal(changed, want_changed)
    assert changed[:2].all() and torch.equal(out[2], hidden[2])
    edit_form = dspa.row_steering().edit  # the engine's form: only the latents some row selects are decoded
    narrow = edit_form.prepare({"minus": minus, "plus": plus, "alpha": alpha})
    assert narrow["latents"].numel() < sae.d_sae
    narrow_out, narrow_changed = torch.compile(edit_form, backend="eager", fullgraph=True)(hidden, edit, narrow)
    torch.testing.assert_close(narrow_out, want)
    assert torch.equal(narrow_changed, want_changed) and torch.equal(narrow_out[2], hidden[2])
    assert isinstance(dspa._edited, torch.Tensor) and isinstance(dspa.edited_tokens, int)


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
    cfg = ServeConfig(port=0, intervention="prompt-prefix:Answer in French.", methods=["plain=base"])
    with build_server(cfg, model=model, tokenizer=smol_tokenizer) as srv:
        assert srv.model_name == "tiny-chat-2+prompt-prefix" and srv.intervention.system_prompt == "Answer in French."
        out = _chat(srv, CONVS[0], srv.model_name, max_tokens=3)
        plain = _chat(srv, CONVS[0], "plain", max_tokens=3)
    prompt = render_chat(smol_tokenizer, CONVS[0], "Answer in French.")
    assert out["usage"]["prompt_tokens"] == len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    plain_prompt = render_chat(smol_tokenizer, CONVS[0])
    assert plain["usage"]["prompt_tokens"] == len(smol_tokenizer(plain_prompt, add_special_tokens=False)["input_ids"])
