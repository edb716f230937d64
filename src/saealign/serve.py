"""`saealign serve`: base and steered models behind one OpenAI-compatible HTTP endpoint.

An ASGI app (FastAPI, served by uvicorn) in front of a `BatchEngine` thread that decodes every request in
one shared batch (continuous batching: requests join at step boundaries). Each request picks its method:
`model` names a registered method (`base`, the served default, any `--method NAME=SPEC`, or one added
through `POST /admin/methods`), and the extension field `steering` sets its own alpha/k_prompt/k_diff/mode
(coef for RepE). Rows of different methods share a batch through the interventions' per-row form
(`saealign.steering.RowSteering`); a request's settings live in its rows only, never in the method.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream` as OpenAI server-sent events),
`GET /v1/models`, `GET /health`, `GET /metrics`, `POST /admin/methods`, `DELETE /admin/methods/{name}`.
Limits: queue length (429), `max_tokens`, the model's context length (an over-long input is a 400 naming
the limit, never cut), a per-request timeout (504); a client that disconnects has its rows dropped at the
next step. Binds to 127.0.0.1 by default. Log-probabilities are those of the raw model distribution.
"""

import asyncio
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from saealign.config import ConfigError, check_config
from saealign.models import ModelOptions
from saealign.runtime.generation import BatchEngine, DecodeRow, QueueFull, Sampling, render_chat
from saealign.steering import Intervention, row_steering, system_prompt_of

log = logging.getLogger(__name__)

MAX_N = 16
MAX_TOP_LOGPROBS = 20
BASE = "base"


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> "JSONResponse":  # noqa: F821
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.code, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


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


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4", param="stop")
    return tuple(stops)


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


@dataclass
class Method:
    """A registered method: what `model` names in a request."""

    name: str
    spec: str
    intervention: Intervention | None


@dataclass
class Job:
    """One HTTP request's rows (n choices per prompt), and the event its handler waits on."""

    method: Method
    rows: list[DecodeRow]
    n: int  # completions per prompt (rows are prompt-major)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True


class OpenAIServer:
    """Serve `model` at `http://host:port/v1` with the registered methods (`methods`: name -> intervention;
    `intervention` is the default, served as `model_name`; `base` is always there).

    Port 0 picks a free port (see `.port`). Use `start()` for background threads (tests, notebooks) or
    `serve_forever()` to block; `shutdown()` (or the context manager) stops it.
    """

    def __init__(self, model, tokenizer, *, model_name: str, intervention: Intervention | None = None,
                 methods: dict[str, Intervention | None] | None = None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_tokens_limit: int = 4096, default_max_tokens: int = 512,
                 max_batch: int = 64, max_queue: int = 256, request_timeout_s: float = 600.0):
        self.model, self.tokenizer = model, tokenizer
        self.model_name, self.api_key = model_name, api_key
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self.methods: dict[str, Method] = {}
        self.register(model_name, intervention, spec=getattr(intervention, "name", BASE))
        if model_name != BASE:
            self.register(BASE, None, spec=BASE)
        for name, method in (methods or {}).items():
            self.register(name, method, spec=getattr(method, "name", BASE))
        self.engine = BatchEngine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        self.requests = {"completed": 0, "rejected": 0, "failed": 0, "cancelled": 0}
        import uvicorn  # the serving stack is the `serve` extra: imported when a server is built

        self.app = _make_app(self)
        self._socket = socket.create_server((host, port), backlog=2048)
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                      timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._socket.getsockname()[0]

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def intervention(self) -> Intervention | None:
        return self.methods[self.model_name].intervention

    def register(self, name: str, intervention: Intervention | None, spec: str) -> Method:
        """Add a method; it must have a per-row form, since every method shares the one batch."""
        row_steering(intervention)  # refuses an intervention that cannot share a batch, before any request
        self.methods[name] = Method(name, spec, intervention)
        return self.methods[name]

    def serve_forever(self) -> None:
        log.info("serving %s at %s", self.model_name, self.url)
        self.engine.start()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.engine.close()

    def start(self) -> "OpenAIServer":
        self.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="saealign-serve", daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.close()
        self._socket.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------ request handling

    def _method(self, body: dict[str, Any]) -> Method:
        if "intervention" in body:
            raise RequestError(400, "choose a method with 'model' and its settings with 'steering'", param="intervention")
        name = body.get("model") or self.model_name
        if name not in self.methods:
            raise RequestError(404, f"model {name!r} not found; this server serves {sorted(self.methods)}",
                               code="model_not_found", param="model")
        return self.methods[name]

    @staticmethod
    def _settings(body: dict[str, Any]) -> dict[str, Any]:
        settings = body.get("steering") or {}
        if not isinstance(settings, dict):
            raise RequestError(400, "'steering' must be an object of settings (alpha, k_prompt, k_diff, mode, coef)",
                               param="steering")
        return settings

    def _rows(self, body: dict[str, Any], method: Method, prompts: list[list[int]], *, default_max_tokens: int,
              prompt_param: str, stream: bool, top_logprobs: int | None) -> list[DecodeRow]:
        """The decode rows of a request: `n` per prompt, each with the request's own steering and settings."""
        try:
            steering = row_steering(method.intervention, **self._settings(body))
        except ConfigError as err:
            raise RequestError(400, f"steering.{err}", param=f"steering.{err.field}") from err
        explicit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _integer({"max_tokens": explicit}, "max_tokens", default_max_tokens, 1, self.max_tokens_limit)
        context = self.engine.context_length
        longest = max(len(p) for p in prompts)
        if context is not None:
            if longest >= context:
                raise RequestError(400, f"the input is {longest} tokens; the model's context length is {context} "
                                   "tokens, with room for at least one new token", code="context_length_exceeded",
                                   param=prompt_param)
            if explicit is None:
                max_tokens = min(max_tokens, context - longest)
            elif longest + max_tokens > context:
                raise RequestError(400, f"the input ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                   f"model's context length of {context} tokens", code="context_length_exceeded",
                                   param="max_tokens")
        sampling = Sampling(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), max_new_tokens=max_tokens)
        n = _integer(body, "n", 1, 1, MAX_N)
        if len(prompts) * n > MAX_N:
            raise RequestError(400, f"at most {MAX_N} completions per request", param="n")
        seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
        seed = random.randrange(2 ** 31) if seed is None else seed % (2 ** 31)
        stops = _stops(body)
        deadline = time.monotonic() + self.request_timeout_s
        return [DecodeRow(ids, sampling, seed=seed + i, steering=steering, top_logprobs=top_logprobs, stops=stops,
                          deadline=deadline, stream=stream) for ids in prompts for i in range(n)]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_job(self, body: dict[str, Any], stream: bool) -> Job:
        method = self._method(body)
        messages = _messages(body)
        k = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.get("logprobs") else None
        prompt = self._encode(render_chat(self.tokenizer, messages, system_prompt_of(method.intervention)))
        rows = self._rows(body, method, [prompt], default_max_tokens=self.default_max_tokens, prompt_param="messages",
                          stream=stream, top_logprobs=k)
        return Job(method, rows, len(rows))

    def completion_job(self, body: dict[str, Any], stream: bool) -> Job:
        method = self._method(body)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        if body.get("echo"):
            raise RequestError(400, "echo is not supported", param="echo")
        encoded = [self._encode(p) for p in prompts]
        if not all(encoded):
            raise RequestError(400, "'prompt' must not be empty: there is nothing to continue", param="prompt")
        k = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        rows = self._rows(body, method, encoded, default_max_tokens=16, prompt_param="prompt", stream=stream,
                          top_logprobs=k)
        return Job(method, rows, len(rows) // len(encoded))

    def submit(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        for row in job.rows:
            row.notify = lambda: loop.call_soon_threadsafe(job.wake.set)
        try:
            self.engine.submit(job.rows)
        except QueueFull as err:
            self.requests["rejected"] += 1
            raise RequestError(429, f"server busy: {err}; retry later", code="rate_limit_exceeded") from err

    def check_outcome(self, job: Job) -> None:
        """A finished job's rows ended normally (stop/length), or the error the client should see."""
        reasons = {r.finish_reason for r in job.rows}
        if "error" in reasons:
            self.requests["failed"] += 1
            message = next(r.error for r in job.rows if r.error)
            raise RequestError(500, f"generation failed: {message}", code="server_error")
        if "timeout" in reasons:
            self.requests["failed"] += 1
            raise RequestError(504, f"the request ran past the server's timeout of {self.request_timeout_s:g} s",
                               code="timeout")
        self.requests["completed"] += 1

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp, "bytes": list(t.encode())}
                                 for i, lp in top]}

    def legacy_logprobs(self, row: DecodeRow, start: int = 0) -> dict[str, Any]:
        entries = (row.logprobs or [])[start:]
        tokens = [self._token_text(t.token_id) for t in entries]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in entries],
                "top_logprobs": [{self._token_text(i): lp for i, lp in t.top} for t in entries], "text_offset": offsets}

    def chat_logprobs(self, row: DecodeRow, start: int = 0) -> dict[str, Any] | None:
        if row.logprobs is None:
            return None
        return {"content": [self.token_entry(t.token_id, t.logprob, t.top) for t in row.logprobs[start:]]}

    def response(self, job: Job, chat: bool) -> dict[str, Any]:
        choices = []
        for index, row in enumerate(job.rows):
            choice: dict[str, Any] = {"index": index, "finish_reason": row.finish_reason}
            if chat:
                choice.update(message={"role": "assistant", "content": row.text(self.tokenizer)},
                              logprobs=self.chat_logprobs(row))
            else:
                choice.update(text=row.text(self.tokenizer),
                              logprobs=None if row.logprobs is None else self.legacy_logprobs(row))
            choices.append(choice)
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": job.method.name, "choices": choices, "usage": _usage(job),
                "saealign": {"method": job.method.spec, "edited_tokens": [r.edited_tokens for r in job.rows]}}

    def metrics(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {"queue_depth": self.engine.queue_depth, "running_rows": self.engine.running,
                "max_batch": self.engine.max_batch, "max_queue": self.engine.max_queue,
                "tokens_per_second": round(self.engine.tokens_per_second(), 2), "generated_tokens": stats["tokens"],
                "prompt_tokens": stats["prompt_tokens"], "decode_steps": stats["steps"], "prefills": stats["prefills"],
                "rows_finished": dict(stats["finished"]), "requests": dict(self.requests), "methods": sorted(self.methods)}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card(name) for name in self.methods]}

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "saealign",
                "saealign": {"method": self.methods[name].spec}}

    def authorized(self, header: str | None) -> bool:
        return self.api_key is None or header == f"Bearer {self.api_key}"


def _usage(job: Job) -> dict[str, int]:
    """OpenAI counts each prompt once, however many completions (`n`) it gets."""
    prompt = sum(len(r.prompt_ids) for r in job.rows[::job.n])
    completion = sum(len(r.token_ids) for r in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _wait(job: Job, request) -> None:
    """Until every row of the job is done; a client that disconnects has its rows dropped."""
    try:
        while True:
            job.wake.clear()
            if job.done:
                return
            try:
                await asyncio.wait_for(job.wake.wait(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
    finally:
        if not job.done:  # the handler itself was cancelled (shutdown)
            job.cancel()


async def _stream(server: OpenAIServer, job: Job, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI server-sent events: text deltas as tokens arrive, then each choice's finish reason, then [DONE].
    Text that may still become part of a stop string, or an incomplete character, is held back."""
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    hold = max((len(s) for s in job.rows[0].stops), default=1) - 1
    sent_text = [0] * len(job.rows)
    sent_tokens = [0] * len(job.rows)
    finished = [False] * len(job.rows)

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": job.method.name, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def delta(index: int, row: DecodeRow, text: str, finish: str | None) -> dict[str, Any]:
        start, sent_tokens[index] = sent_tokens[index], len(row.token_ids)
        if chat:
            return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish,
                    "logprobs": server.chat_logprobs(row, start)}
        logprobs = None if row.logprobs is None else server.legacy_logprobs(row, start)
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    try:
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(job.rows))])
        while True:
            job.wake.clear()
            for i, row in enumerate(job.rows):
                if finished[i]:
                    continue
                done = row.done
                text = row.text(server.tokenizer)
                ready = len(text) if done else max(sent_text[i], len(text.rstrip("\ufffd")) - hold)
                if done and row.finish_reason in ("error", "timeout"):
                    message = row.error or f"the request ran past the server's timeout of {server.request_timeout_s:g} s"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': row.finish_reason}})}\n\n"
                    return
                if ready > sent_text[i] or done:
                    yield event([delta(i, row, text[sent_text[i]:ready], row.finish_reason if done else None)])
                    sent_text[i] = ready
                finished[i] = done
            if all(finished):
                break
            await job.wake.wait()
        if include_usage:
            yield event([], usage=_usage(job))
        server.requests["completed"] += 1
        yield "data: [DONE]\n\n"
    finally:
        if not job.done:  # the client went away (or the server stops): free its rows
            job.cancel()
            server.requests["cancelled"] += 1


def _make_app(server: OpenAIServer) -> "FastAPI":  # noqa: F821
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    def authorize(request: Request) -> None:
        if request.url.path not in ("/health", "/metrics") and not server.authorized(request.headers.get("Authorization")):
            raise RequestError(401, "invalid or missing API key", code="invalid_api_key")

    # a dependency, not a middleware: an HTTP middleware wraps `receive` and hides client disconnects
    app = FastAPI(title="saealign", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorize)])

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else "invalid_request_error"
        return RequestError(err.status_code, f"no route {request.method} {request.url.path}" if err.status_code in (404, 405)
                            else str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return RequestError(500, f"{type(err).__name__}: {err}", code="server_error").response()

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    async def complete(request: Request, chat: bool):
        body = await json_body(request)
        stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        job = (server.chat_job if chat else server.completion_job)(body, stream)
        server.submit(job)
        if stream:
            return StreamingResponse(_stream(server, job, chat, bool(options.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await _wait(job, request)
        if any(r.finish_reason == "cancelled" for r in job.rows):
            server.requests["cancelled"] += 1
            raise RequestError(499, "the client closed the request", code="cancelled")
        server.check_outcome(job)
        return server.response(job, chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in server.methods:
            raise RequestError(404, f"model {name!r} not found", code="model_not_found", param="model")
        return server.model_card(name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": server.engine.queue_depth, "running_rows": server.engine.running}

    @app.get("/metrics")
    async def metrics():
        return server.metrics()

    @app.post("/admin/methods")
    async def add_method(request: Request):
        """Register a method from a spec (`dspa:MAP_DIR`, `repe:DIR`, ...) with default `options` for it."""
        body = await json_body(request)
        name, spec, options = body.get("name"), body.get("spec"), body.get("options") or {}
        if not isinstance(name, str) or not name or name == server.model_name:
            raise RequestError(400, "'name' must be a non-empty string other than the served default", param="name")
        if name in server.methods and not body.get("replace"):
            raise RequestError(409, f"method {name!r} exists; pass \"replace\": true to replace it", param="name")
        if not isinstance(spec, str) or not isinstance(options, dict):
            raise RequestError(400, "'spec' must be a method spec string and 'options' an object", param="spec")
        from saealign.steering import load_method

        try:
            intervention = await run_in_threadpool(load_method, spec, server.model, **options)
            method = server.register(name, intervention, spec)
        except ConfigError as err:
            raise RequestError(400, str(err), param=f"options.{err.field}") from err
        except (ValueError, FileNotFoundError) as err:
            raise RequestError(400, str(err), param="spec") from err
        return server.model_card(method.name)

    @app.delete("/admin/methods/{name:path}")
    async def remove_method(name: str):
        """Unregister a method; requests already running with it finish as they started."""
        if name not in server.methods or name in (BASE, server.model_name):
            raise RequestError(404, f"no removable method {name!r}", code="model_not_found", param="name")
        del server.methods[name]
        return {"id": name, "deleted": True}

    return app


def stream_chat(url: str, body: dict[str, Any], api_key: str | None = None, timeout: float = 600.0) -> Iterator[str]:
    """The text deltas of a streamed chat completion from an OpenAI-compatible server at `url` (.../v1)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.stream("POST", url.rstrip("/") + "/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=timeout) as resp:
        if resp.status_code != 200:
            resp.read()
            raise ValueError(f"{url}: {resp.status_code} {resp.json().get('error', {}).get('message', resp.text)}")
        for line in resp.iter_lines():
            data = line.removeprefix("data: ")
            if data == line or not data:
                continue
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ValueError(f"{url}: {event['error']['message']}")
            for choice in event["choices"]:
                if choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]


@dataclass
class ServeConfig(ModelOptions):
    """`saealign serve`: an OpenAI-compatible server of the base model and its steered methods, in one batch."""

    intervention: str | None = field(default=None, metadata={
        "help": "The method a request gets when its `model` names the served id: an artifact directory or a method "
                "spec (prompt-prefix[:TEXT], dspa:DIR, ...) (default: the unsteered model)."})
    methods: list[str] = field(default_factory=list, metadata={
        "help": "More methods a request can name as its `model`: NAME=SPEC (repeat the flag)."})
    name: str | None = field(default=None, metadata={"help": "Served model id (default: model[+intervention])."})
    host: str = field(default="127.0.0.1", metadata={"help": "Bind address; 0.0.0.0 exposes it to the network."})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port).", "ge": 0, "le": 65535})
    api_key_env: str | None = field(default=None, metadata={
        "help": "Require `Bearer $VAR` from every request, VAR being this environment variable (default: open)."})
    max_tokens_limit: int = field(default=4096, metadata={
        "help": "Largest max_tokens a request may ask for; more is a 400.", "ge": 1})
    default_max_tokens: int = field(default=512, metadata={
        "help": "Tokens generated for a chat request that gives no max_tokens.", "ge": 1})
    max_batch: int = field(default=64, metadata={"ge": 1, "help": "Rows decoded together in one step."})
    max_queue: int = field(default=256, metadata={"ge": 1, "help": "Rows waiting beyond max_batch; more is a 429."})
    request_timeout_s: float = field(default=600.0, metadata={"gt": 0, "help": "Seconds a request may run; "
                                                                               "longer is a 504."})

    def __post_init__(self) -> None:
        check_config(self)


def _named_methods(specs: list[str], model) -> dict[str, Intervention | None]:
    from saealign.steering import load_method

    methods = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ConfigError("methods", f"must be NAME=SPEC, got {item!r}")
        methods[name] = load_method(spec, model=model)
    return methods


def build_server(cfg: ServeConfig, model=None, tokenizer=None, intervention=None) -> OpenAIServer:
    """The server a config describes (the model is loaded unless passed in)."""
    from saealign.steering import default_name, load_policy

    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ValueError(f"--api-key-env {cfg.api_key_env}: the variable is not set")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", cfg.host)
    return OpenAIServer(model, tokenizer, model_name=default_name(cfg, model, intervention), intervention=intervention,
                        methods=_named_methods(cfg.methods, model), host=cfg.host, port=cfg.port, api_key=api_key,
                        max_tokens_limit=cfg.max_tokens_limit, default_max_tokens=cfg.default_max_tokens,
                        max_batch=cfg.max_batch, max_queue=cfg.max_queue, request_timeout_s=cfg.request_timeout_s)
