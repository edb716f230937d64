"""Judges behind one interface: an OpenAI-compatible HTTP endpoint, a local causal LM, a local reward model.

Every judge offers some of three capabilities, all over chat conversations (`[{"role", "content"}]`):

- `chat`: generate a judgment text (MT-Bench single-answer grading);
- `label_probs`: the probability of each answer label as the judge's next token (AlpacaEval's
  weighted pairwise judge: one token, logprobs);
- `reward`: a scalar score of a conversation that ends with the assistant's answer.

Results are cached on disk (SQLite) keyed by the judge's identity, the capability, the prompt and the
decoding settings, so an interrupted evaluation resumes without paying for finished judgments again.
A request that still fails after the retries yields `None` (counted as missing by the harness) and is
not cached, so the next run asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from saealign.config import ConfigError
from saealign.models import DEFAULT_MODEL
from saealign.runtime.generation import Conversation, Sampling, generate, next_token_logprobs

log = logging.getLogger(__name__)

CHAT, LABEL_PROBS, REWARD, CONTINUATIONS = "chat", "label_probs", "reward", "continuations"


class JudgeError(RuntimeError):
    """A judge cannot do what was asked (missing capability, rejected request, bad response)."""


class JudgmentCache:
    """A SQLite table `key -> JSON value`; safe to share between threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    @staticmethod
    def key(identity: str, kind: str, payload: Any) -> str:
        blob = json.dumps({"judge": identity, "kind": kind, "payload": payload}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Judge:
    """Base class: subclasses implement `_chat`, `_label_probs` and/or `_reward` on lists of prompts and
    list what they implement in `capabilities`. Callers use the public, cached methods, which hand the
    uncached prompts to the subclass `chunk_size` at a time and store each chunk's results at once."""

    capabilities: frozenset[str] = frozenset()
    chunk_size: int = 16

    def __init__(self, name: str, cache: JudgmentCache | str | os.PathLike | None = None, identity: str | None = None):
        self.name = name  # recorded in judgment files
        self.identity = identity or name  # part of every cache key
        self.cache = JudgmentCache(cache) if isinstance(cache, (str, os.PathLike)) else cache

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def chat(self, conversations: Sequence[Conversation], max_tokens: int = 2048,
             progress: bool = True) -> list[str | None]:
        """Greedy (temperature 0) judgment texts."""
        return self._cached(CHAT, conversations, {"max_tokens": max_tokens}, lambda todo: self._chat(todo, max_tokens),
                            progress)

    def label_probs(self, conversations: Sequence[Conversation], labels: Sequence[str],
                    progress: bool = True) -> list[dict[str, float] | None]:
        """Probability of each label being the judge's next token (unnormalised: the rest of the mass is
        on other tokens; labels the judge gave no probability to are 0). `None` = no usable answer."""
        return self._cached(LABEL_PROBS, conversations, {"labels": list(labels)},
                            lambda todo: self._label_probs(todo, list(labels)), progress)

    def continuation_logprobs(self, conversations: Sequence[Conversation], prefix: str, continuations: Sequence[str],
                              progress: bool = True) -> list[list[float] | None]:
        """Log-likelihood of each of `continuations` as the rest of a judge reply that begins with `prefix`
        (one list per conversation, in the order of `continuations`)."""
        return self._cached(CONTINUATIONS, conversations, {"prefix": prefix, "continuations": list(continuations)},
                            lambda todo: self._continuations(todo, prefix, list(continuations)), progress)

    def reward(self, conversations: Sequence[Conversation], progress: bool = True) -> list[float | None]:
        """Scalar reward of each conversation (the last turn is the assistant answer being scored)."""
        return self._cached(REWARD, conversations, {}, self._reward, progress)

    def _cached(self, kind: str, conversations: Sequence[Conversation], params: dict[str, Any],
                compute: Callable[[list[Conversation]], list[Any]], progress: bool) -> list[Any]:
        if kind not in self.capabilities:
            raise JudgeError(f"judge {self.name!r} cannot do {kind!r} (it supports {sorted(self.capabilities)})")
        keys = [JudgmentCache.key(self.identity, kind, {"messages": c, **params}) for c in conversations]
        results: list[Any] = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        with tqdm(total=len(todo), desc=f"judge {self.name} ({kind})", disable=not progress or not todo,
                  leave=False) as bar:
            for start in range(0, len(todo), self.chunk_size):
                part = todo[start:start + self.chunk_size]
                for i, value in zip(part, compute([conversations[i] for i in part]), strict=True):
                    results[i] = value
                    if value is not None and self.cache is not None:
                        self.cache.put(keys[i], value)
                bar.update(len(part))
        log.info("judge %s (%s): %d cached, %d computed", self.name, kind, len(keys) - len(todo), len(todo))
        return results

    def _chat(self, conversations: list[Conversation], max_tokens: int) -> list[str | None]:
        raise NotImplementedError

    def _label_probs(self, conversations: list[Conversation], labels: list[str]) -> list[dict[str, float] | None]:
        raise NotImplementedError

    def _continuations(self, conversations: list[Conversation], prefix: str,
                       continuations: list[str]) -> list[list[float] | None]:
        raise NotImplementedError

    def _reward(self, conversations: list[Conversation]) -> list[float | None]:
        raise NotImplementedError


def single_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The token id of each label; a label must be exactly one token to be read off one forward pass."""
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise JudgeError(f"label {label!r} is {len(encoded)} tokens for this tokenizer; label probabilities "
                             "need single-token labels")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise JudgeError(f"labels {list(labels)} map to the same token")
    return ids


class HFJudge(Judge):
    """A local causal LM as judge: greedy generation for `chat`, one forward pass for `label_probs`,
    log-likelihood scoring (the multiple-choice scorer) for `continuation_logprobs`."""

    capabilities = frozenset({CHAT, LABEL_PROBS, CONTINUATIONS})

    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int = 4,
                 cache: JudgmentCache | str | os.PathLike | None = None):
        from saealign.models import model_id

        super().__init__(name or model_id(model), cache)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.chunk_size = 4 * batch_size  # a few batches per cache write; generate() sorts each chunk by length

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | None = None, dtype: str | None = None,
                        **kwargs: Any) -> "HFJudge":
        from saealign.models import load_model

        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    def _render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _chat(self, conversations, max_tokens):
        prompts = [self._render(c) for c in conversations]
        outs = generate(self.model, self.tokenizer, prompts, Sampling(temperature=0.0, max_new_tokens=max_tokens),
                        batch_size=self.batch_size, progress=False)
        return [g.text for g in outs]

    def _label_probs(self, conversations, labels):
        ids = single_token_ids(self.tokenizer, labels)
        logprobs = next_token_logprobs(self.model, self.tokenizer, [self._render(c) for c in conversations],
                                       self.batch_size)
        return [{label: math.exp(float(row[i])) for label, i in zip(labels, ids)} for row in logprobs]

    def _continuations(self, conversations, prefix, continuations):
        from saealign.runtime.scoring import score_requests

        requests = [(self._render(c) + prefix, text) for c in conversations for text in continuations]
        scores = score_requests(self.model, self.tokenizer, requests, batch_size=self.batch_size * len(continuations),
                                desc="judge continuations")
        k = len(continuations)
        return [scores[i:i + k] for i in range(0, len(scores), k)]


class RewardModelJudge(Judge):
    """A local `AutoModelForSequenceClassification` with a scalar head (Skywork-Reward, ArmoRM, ...).

    Conversations are rendered with the reward model's own chat template; a tokenizer without one gets
    the (question, answer) text pair, the convention of the OpenAssistant DeBERTa reward models.
    Items are scored one at a time so that padding never moves the pooled (last) token.
    """

    capabilities = frozenset({REWARD})

    def __init__(self, path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                 cache: JudgmentCache | str | os.PathLike | None = None, name: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from saealign.models import resolve_device, resolve_dtype

        super().__init__(name or f"rm:{Path(path).name}", cache, identity=f"rm:{Path(path).resolve()}")
        dev = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
        self.model.to(dev).eval()
        if self.model.config.num_labels != 1:
            log.warning("reward model %s has %d outputs; using the first as the reward", path,
                        self.model.config.num_labels)

    def _encode(self, conversation: Conversation):
        if conversation[-1]["role"] != "assistant":
            raise ValueError("a conversation to score must end with the assistant's answer")
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        question = "\n\n".join(m["content"] for m in conversation[:-1] if m["role"] != "assistant")
        return self.tokenizer(question, conversation[-1]["content"], return_tensors="pt", truncation=True)

    def _reward(self, conversations):
        import torch

        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for conv in conversations:
                enc = self._encode(conv).to(device)
                out.append(float(self.model(**enc).logits[0, 0].float()))
        return out


_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIJudge(Judge):
    """Any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, `saealign serve`, ...).

    The key is read from the environment variable `api_key_env` (no header when it is unset, as local
    servers expect). Up to `concurrency` requests run at once; connection errors, timeouts, 408/409/425/429
    and 5xx are retried `max_retries` times with exponential backoff (honouring `Retry-After`); other
    HTTP errors (bad model name, bad key) stop the run at once.
    """

    capabilities = frozenset({CHAT, LABEL_PROBS})

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 max_retries: int = 4, timeout_s: float = 120.0, backoff_s: float = 1.0, top_logprobs: int = 5,
                 cache: JudgmentCache | str | os.PathLike | None = None):
        base_url = base_url.rstrip("/")
        super().__init__(model, cache, identity=f"{base_url}|{model}")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        self.base_url, self.model = base_url, model
        self.api_key = os.environ.get(api_key_env) or None
        self.concurrency, self.max_retries = concurrency, max_retries
        self.chunk_size = 4 * concurrency  # keeps the workers busy; each chunk is cached as it finishes
        self.timeout_s, self.backoff_s, self.top_logprobs = timeout_s, backoff_s, top_logprobs

    def request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST to `chat/completions`; the parsed response, or None when every retry failed."""
        data = json.dumps({"model": self.model, **body}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * 2 ** attempt
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                if err.code not in _RETRYABLE_STATUS:
                    raise JudgeError(f"{url} answered HTTP {err.code}: {detail}") from err
                retry_after = err.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                problem = f"{type(err).__name__}: {err}"
            if attempt < self.max_retries:
                log.warning("%s failed (%s); retry %d/%d in %.1fs", url, problem, attempt + 1, self.max_retries, wait)
                time.sleep(min(wait, 60.0))
        log.error("%s failed after %d attempts: %s", url, self.max_retries + 1, problem)
        return None

    def _map(self, fn: Callable[[Conversation], Any], conversations: list[Conversation]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, conversations))

    def _chat(self, conversations, max_tokens):
        def one(conv: Conversation) -> str | None:
            resp = self.request({"messages": conv, "temperature": 0.0, "max_tokens": max_tokens})
            return None if resp is None else chat_content(resp)

        return self._map(one, conversations)

    def _label_probs(self, conversations, labels):
        def one(conv: Conversation) -> dict[str, float] | None:
            resp = self.request({"messages": conv, "temperature": 0.0, "max_tokens": 1, "logprobs": True,
                                 "top_logprobs": self.top_logprobs})
            return None if resp is None else label_probs_from_response(resp, labels)

        return self._map(one, conversations)


def chat_content(response: dict[str, Any]) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise JudgeError(f"not a chat completion response: {json.dumps(response)[:300]}") from err
    return content or ""


def label_probs_from_response(response: dict[str, Any], labels: Sequence[str]) -> dict[str, float] | None:
    """Label probabilities from the first generated token's `top_logprobs` (tokens compared after stripping
    whitespace, their probabilities summed). Without logprobs, the generated text decides (probability 1);
    `None` when neither names a label."""
    choice = (response.get("choices") or [{}])[0]
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content and content[0].get("top_logprobs"):
        probs = {label: 0.0 for label in labels}
        for entry in content[0]["top_logprobs"]:
            token = (entry.get("token") or "").strip()
            if token in probs and entry.get("logprob") is not None:
                probs[token] += math.exp(entry["logprob"])
        if any(p > 0 for p in probs.values()):
            return probs
    text = ((choice.get("message") or {}).get("content") or "").strip()
    if text in labels:
        return {label: float(label == text) for label in labels}
    return None


def judge_kind(spec: str, base_url: str | None = None) -> str:
    """The kind of a judge spec (openai, hf, rm or self); a malformed spec is refused, so a benchmark
    config can check its judge before any answer is generated."""
    kind, _, arg = spec.partition(":")
    if kind == "openai":
        if not base_url or not arg:
            raise ValueError("an openai judge needs `openai:MODEL` and --judge-base-url")
        return kind
    if (kind in ("hf", "rm") and arg) or spec == "self":
        return kind
    raise ValueError(f"unknown judge {spec!r}: expected openai:MODEL, hf:NAME_OR_PATH, rm:PATH or self")


def judge_capabilities(spec: str, base_url: str | None = None) -> frozenset[str]:
    """What the judge a spec names can do, known without building it (so a judge mode it cannot serve
    is refused before any answer is generated)."""
    classes = {"openai": OpenAIJudge, "hf": HFJudge, "rm": RewardModelJudge, "self": HFJudge}
    return classes[judge_kind(spec, base_url)].capabilities


@dataclass
class JudgeOptions:
    """The judge of a judged benchmark (`eval mt-bench`, `eval alpaca-eval`), declared once; `judge_of` builds it."""

    judge: str = field(default=f"hf:{DEFAULT_MODEL}", metadata={
        "help": "openai:MODEL (an OpenAI-compatible endpoint) | hf:NAME_OR_PATH (a local causal LM) | rm:PATH "
                "(a local reward model, pairwise only) | self (the evaluated weights, unsteered); "
                "keep one judge across the methods you compare."})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "Base URL of the openai: judge's endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 "
                "(required with an openai: judge)."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the openai: judge's API key (sent as a Bearer token; none when unset)."})
    judge_concurrency: int = field(default=4, metadata={
        "help": "Requests in flight at once to an openai: judge.", "ge": 1})
    judge_max_retries: int = field(default=4, metadata={
        "help": "Retries (exponential backoff) of an openai: judge request that failed transiently (timeout, 429, 5xx); after them that judgment is missing.", "ge": 0})
    judge_timeout_s: float = field(default=300.0, metadata={
        "help": "Seconds one request to an openai: judge may take.", "gt": 0})
    judge_batch_size: int = field(default=4, metadata={
        "help": "Judge prompts per forward pass of a local (hf:, self) judge.", "ge": 1})
    judge_cache: Path | None = field(default=None, metadata={
        "help": "SQLite file caching every judgment by (judge, prompt), so a rerun resumes "
                "(default: OUTPUT/judge_cache.sqlite)."})
    skip_judge: bool = field(default=False, metadata={"help": "Only generate the outputs; judge nothing."})


def check_judge_config(cfg: Any, needs: str | None) -> None:
    """Refuse a benchmark config (`eval mt-bench`, `eval alpaca-eval`) whose judge spec is malformed or whose
    judge cannot do what its `judge_mode` `needs` (a capability; None: any) — before anything is generated."""
    if cfg.skip_judge:
        return
    capabilities = judge_capabilities(cfg.judge, cfg.judge_base_url)  # refuses a malformed spec
    if needs is not None and needs not in capabilities:
        raise ConfigError("judge_mode", f"{cfg.judge_mode!r} needs a judge that can do {needs!r}; "
                                        f"{cfg.judge!r} cannot")


def build_judge(spec: str, *, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                max_retries: int = 4, timeout_s: float = 120.0, cache: JudgmentCache | str | os.PathLike | None = None,
                device: str | None = None, dtype: str | None = None, batch_size: int = 4,
                policy: tuple[Any, Any] | None = None) -> Judge:
    """A judge from a command-line spec:

    - `openai:MODEL` (with `base_url`): an OpenAI-compatible endpoint;
    - `hf:NAME_OR_PATH`: a local causal LM (a `saealign models` alias, a directory or a hub id); when the
      evaluated model was loaded from the same name, its weights are shared (judging never steers);
    - `rm:PATH`: a local reward model;
    - `self`: the evaluated model's own base weights, unsteered (`policy` = `(model, tokenizer)`).
    """
    from saealign.models import model_id

    kind = judge_kind(spec, base_url)
    arg = spec.partition(":")[2]
    if kind == "openai":
        return OpenAIJudge(base_url, arg, api_key_env=api_key_env, concurrency=concurrency, max_retries=max_retries,
                           timeout_s=timeout_s, cache=cache)
    if kind == "hf":
        if policy is not None and model_id(policy[0]) == arg:  # the same weights as the policy: no second copy
            return HFJudge(*policy, batch_size=batch_size, cache=cache)
        return HFJudge.from_pretrained(arg, device=device, dtype=dtype, batch_size=batch_size, cache=cache)
    if kind == "rm":
        return RewardModelJudge(arg, device=device, dtype=dtype, cache=cache)
    if policy is None:
        raise ValueError("judge `self` needs the evaluated model")
    return HFJudge(*policy, batch_size=batch_size, cache=cache)


def judge_of(cfg: Any, cache: str | os.PathLike, policy: tuple[Any, Any] | None = None) -> Judge:
    """The judge a benchmark config names through its `judge` and `judge_*` fields (`eval mt-bench`,
    `eval alpaca-eval`), with its judgments cached at `cache`."""
    return build_judge(cfg.judge, base_url=cfg.judge_base_url, api_key_env=cfg.judge_api_key_env,
                       concurrency=cfg.judge_concurrency, max_retries=cfg.judge_max_retries,
                       timeout_s=cfg.judge_timeout_s, cache=cache, device=cfg.device, dtype=cfg.dtype,
                       batch_size=cfg.judge_batch_size, policy=policy)
