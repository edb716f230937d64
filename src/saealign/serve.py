"""`saealign serve`: a base or steered model behind an OpenAI-compatible HTTP endpoint.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`.
Standard library only (`ThreadingHTTPServer`): requests are parsed concurrently, generation runs one
request at a time under a lock around the model. The intervention (any object with `apply(model)`,
and optionally `system_prompt`) is active only while a request generates, exactly as in the
evaluation harnesses (the same `saealign.eval.generation` code path). Binds to 127.0.0.1 by default.

Supported request fields: chat — `messages`, `max_tokens`/`max_completion_tokens`, `temperature`
(default 1), `top_p`, `n`, `seed`, `stop`, `logprobs`, `top_logprobs` (<= 20); completions — `prompt`
(a string or a list), `max_tokens` (default 16), `temperature`, `top_p`, `n`, `seed`, `stop`, `logprobs`
(an int, the legacy format). `stream` is refused. `model` must be the served name when given.
Log-probabilities are those of the raw model distribution (before temperature and top-p).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from saealign.eval.generation import Generation, Sampling, generate, render_chat
from saealign.steering import system_prompt_of

log = logging.getLogger(__name__)

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", param=key)
    return value


def _integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be an integer in [{low}, {high}], got {value!r}", param=key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4", param="stop")
    return stops


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _message_text(content: Any) -> str:
    """Chat content as text: a string, or OpenAI content parts of type `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise RequestError(400, "only text content parts are supported", param="messages")
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(400, "message content must be a string or a list of text parts", param="messages")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"messages[{i}]: role must be system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"))})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", param="messages")
    return out


class OpenAIServer:
    """Serve `model` (with `intervention` applied while generating) at `http://host:port/v1`.

    Port 0 picks a free port (see `.port`). Use `start()` for a background thread (tests, notebooks)
    or `serve_forever()` to block; `shutdown()` (or the context manager) stops it.
    """

    def __init__(self, model, tokenizer, *, model_name: str, intervention: Any = None, host: str = "127.0.0.1",
                 port: int = 8000, api_key: str | None = None, max_tokens_limit: int = 4096,
                 default_max_tokens: int = 512):
        self.model, self.tokenizer, self.intervention = model, tokenizer, intervention
        self.model_name, self.api_key = model_name, api_key
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def serve_forever(self) -> None:
        log.info("serving %s at %s", self.model_name, self.url)
        self.httpd.serve_forever()

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="saealign-serve", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=30)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------ request handling

    def _check_model(self, body: dict[str, Any]) -> None:
        requested = body.get("model")
        if requested is not None and requested != self.model_name:
            raise RequestError(404, f"model {requested!r} not found; this server serves {self.model_name!r}",
                               code="model_not_found", param="model")
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported", param="stream")

    def _sampling(self, body: dict[str, Any], default_max_tokens: int) -> tuple[Sampling, int, int]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, self.max_tokens_limit)
        sampling = Sampling(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), max_new_tokens=max_tokens)
        n = _integer(body, "n", 1, 1, MAX_N)
        seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
        return sampling, n, random.randrange(2 ** 31) if seed is None else seed % (2 ** 31)

    def _generate(self, prompts: list[str], sampling: Sampling, seed: int,
                  top_logprobs: int | None) -> list[Generation]:
        with self._lock:
            return generate(self.model, self.tokenizer, prompts, sampling, seed=seed, batch_size=len(prompts),
                            intervention=self.intervention, top_logprobs=top_logprobs, progress=False)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        messages = _messages(body)
        sampling, n, seed = self._sampling(body, self.default_max_tokens)
        stops = _stops(body)
        want_logprobs = bool(body.get("logprobs"))
        k = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if want_logprobs else None
        prompt = render_chat(self.tokenizer, messages, system_prompt_of(self.intervention))
        generations = self._generate([prompt] * n, sampling, seed, k)
        choices = []
        for index, g in enumerate(generations):
            text, stopped = _cut_at_stop(g.text, stops)
            logprobs = None
            if g.logprobs is not None:
                logprobs = {"content": [self._token_entry(t.token_id, t.logprob, t.top) for t in g.logprobs]}
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": "stop" if stopped else g.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage(generations, n)}

    def _token_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp, "bytes": list(t.encode())}
                                 for i, lp in top]}

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        if body.get("echo"):
            raise RequestError(400, "echo is not supported", param="echo")
        sampling, n, seed = self._sampling(body, 16)
        if len(prompts) * n > MAX_N:
            raise RequestError(400, f"at most {MAX_N} completions per request", param="n")
        stops = _stops(body)
        k = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        generations = self._generate([p for p in prompts for _ in range(n)], sampling, seed, k)
        choices = []
        for index, g in enumerate(generations):
            text, stopped = _cut_at_stop(g.text, stops)
            logprobs = None if g.logprobs is None else self._legacy_logprobs(g)
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": "stop" if stopped else g.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage(generations, n)}

    def _legacy_logprobs(self, g: Generation) -> dict[str, Any]:
        tokens = [self._token_text(t.token_id) for t in g.logprobs or []]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in g.logprobs or []],
                "top_logprobs": [{self._token_text(i): lp for i, lp in t.top} for t in g.logprobs or []],
                "text_offset": offsets}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "saealign"}]}

    def authorized(self, header: str | None) -> bool:
        return self.api_key is None or header == f"Bearer {self.api_key}"


def _usage(generations: list[Generation], n: int) -> dict[str, int]:
    """OpenAI counts each prompt once, however many completions (`n`) it gets."""
    prompt = sum(g.prompt_tokens for g in generations[::n])
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _make_handler(app: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "saealign"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            self._send(err.status, {"error": {"message": err.message, "type": err.code, "param": err.param,
                                              "code": err.code}})

        def _route(self, method: str) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path == "/health" and method == "GET":
                    return self._send(200, {"status": "ok"})
                if not app.authorized(self.headers.get("Authorization")):
                    raise RequestError(401, "invalid or missing API key", code="invalid_api_key")
                if method == "GET" and path == "/v1/models":
                    return self._send(200, app.models())
                if method == "GET" and path.startswith("/v1/models/"):
                    if path.removeprefix("/v1/models/") != app.model_name:
                        raise RequestError(404, "model not found", code="model_not_found")
                    return self._send(200, app.models()["data"][0])
                routes = {"/v1/chat/completions": app.chat_completions, "/v1/completions": app.completions}
                if method != "POST" or path not in routes:
                    raise RequestError(404, f"no route {method} {path}", code="not_found")
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise RequestError(400, f"request body is not JSON: {err}") from err
                if not isinstance(body, dict):
                    raise RequestError(400, "request body must be a JSON object")
                return self._send(200, routes[path](body))
            except RequestError as err:
                self._error(err)
            except Exception as err:  # a failed generation must not kill the server
                log.exception("request failed")
                self._error(RequestError(500, f"{type(err).__name__}: {err}", code="server_error"))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


@dataclass
class ServeConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "alias, local dir or hub id"})
    intervention: str | None = field(default=None, metadata={
        "help": "steering: an artifact directory or a method spec (prompt-prefix[:TEXT], dspa:DIR, ...)"})
    name: str | None = field(default=None, metadata={"help": "served model id (default: model[+intervention])"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address; 0.0.0.0 exposes it to the network"})
    port: int = 8000
    api_key_env: str | None = field(default=None, metadata={"help": "require `Bearer $VAR` when this variable is set"})
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    device: str | None = None
    dtype: str | None = None


def build_server(cfg: ServeConfig, model=None, tokenizer=None, intervention=None) -> OpenAIServer:
    """The server a config describes (the model is loaded unless passed in)."""
    from saealign.eval import default_name, load_policy

    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ValueError(f"--api-key-env {cfg.api_key_env}: the variable is not set")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", cfg.host)
    return OpenAIServer(model, tokenizer, model_name=default_name(cfg, model, intervention), intervention=intervention,
                        host=cfg.host, port=cfg.port, api_key=api_key, max_tokens_limit=cfg.max_tokens_limit,
                        default_max_tokens=cfg.default_max_tokens)
