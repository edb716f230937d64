"""Descriptions of SAE latents from a corpus (`saealign sae describe`), for the feature audit.

Per latent: the top-activating contexts (a token window, the activating token marked), activation
density and quantiles, the decoder direction read through the unembedding (logit lens: the tokens it
promotes and suppresses; the final norm is left out, as SAE dashboards do), the activation-weighted
share of its activating tokens in each token class, and a category by `categorize`.

One pass over the corpus keeps mergeable statistics of every latent (counts, a log-spaced histogram,
class masses, the top activations), saved atomically after each chunk of texts with the number of
texts done, so an interrupted run resumes there; a run with another model, SAE, corpus or options is
refused. Tokens are those `activations.keep_mask` keeps (no first token, no attention sink).

Token classes, by a token's own text (so a subword that carries a refusal stem counts as refusal):
- formatting: special tokens, whitespace, newlines, markdown markers (FORMATTING_CHARS only);
- punctuation: only punctuation characters;
- refusal: words starting with a REFUSAL_STEMS stem (refusal, apology, safety vocabulary);
- discourse: DISCOURSE_MARKERS (connectives, hedges, openers and sign-offs that organise an answer);
- function: FUNCTION_WORDS (articles, pronouns, prepositions, conjunctions, auxiliaries);
- content: everything else.
"""

from __future__ import annotations

import string
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign._io import load_tensors, read_json, save_tensors, text_fingerprint, write_json
from saealign.activations import keep_mask, padded_batches
from saealign.config import check_config
from saealign.hooks import read_residuals
from saealign.models import ModelOptions
from saealign.sae.core import SAE

TOKEN_CLASSES = ("formatting", "punctuation", "refusal", "discourse", "function", "content")
CATEGORIES = ("refusal/safety", "discourse", "formatting", "stylistic/tone", "content/topic", "mixed")

FORMATTING_CHARS = frozenset("#*`|>_=~\n\t\r ")
PUNCTUATION = frozenset(string.punctuation + "“”‘’—–…«»")
REFUSAL_STEMS = ("sorry", "apolog", "unfortunate", "cannot", "can't", "unable", "refus", "declin", "inappropriat",
                 "unethical", "illegal", "harm", "dangerous", "offensive", "violat", "unsafe", "safety")
DISCOURSE_MARKERS = frozenset("""
however therefore thus hence moreover furthermore additionally also besides instead meanwhile otherwise
first firstly second secondly third finally lastly overall ultimately essentially basically actually indeed
anyway well so then now still though although whereas nevertheless nonetheless consequently accordingly
similarly likewise specifically generally typically usually often perhaps maybe probably certainly sure
absolutely definitely course example instance e.g i.e namely note hope glad happy thanks thank please
hello hi hey great yes no okay ok alright summary conclusion remember importantly ultimately
""".split())
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no
i me my mine myself you your yours yourself he him his she her hers it its itself we us our ours they them their
theirs what which who whom whose where when why how there here
of in on at by for with about against between into through during before after above below to from up down out
off over under again further once and but or nor if because as until while than
is am are was were be been being have has had having do does did doing will would shall should can could may
might must not don't doesn't didn't isn't aren't wasn't weren't won't wouldn't it's i'm you're that's there's
let's just very too only own same such more most other
""".split())

LOG_RANGE = (-4.0, 5.0)  # log10 activation range of the histogram; values outside land in the end bins
BINS = 180  # 0.05 decades a bin: quantiles to within ~12 %


def token_class(piece: str, special: bool = False) -> str:
    """The class of one token (see the module docstring) from its decoded text."""
    stripped = piece.strip()
    if special or not stripped or "\n" in piece or set(stripped) <= FORMATTING_CHARS:
        return "formatting"
    if set(stripped) <= PUNCTUATION:
        return "punctuation"
    word = stripped.lower().strip(string.punctuation + "“”‘’")
    if word.startswith(REFUSAL_STEMS):
        return "refusal"
    if word in DISCOURSE_MARKERS:
        return "discourse"
    if word in FUNCTION_WORDS:
        return "function"
    return "content"


# Thresholds of the category rule. Refusal and discourse tokens are rare in any text, so a latent
# that puts a quarter (a third) of its mass on them is specific to them; the broad groups need a majority.
CATEGORY_RULE = (("refusal/safety", ("refusal",), 0.25), ("discourse", ("discourse",), 0.3),
                 ("formatting", ("formatting",), 0.5), ("stylistic/tone", ("punctuation", "function"), 0.5),
                 ("content/topic", ("content",), 0.5))


def categorize(shares: dict[str, float]) -> str:
    """The first category of CATEGORY_RULE whose token classes hold at least its share of the latent's
    activation mass; `mixed` when none does."""
    for category, classes, threshold in CATEGORY_RULE:
        if sum(shares.get(c, 0.0) for c in classes) >= threshold:
            return category
    return "mixed"


@dataclass
class DescribeOptions:
    """What the statistics depend on (part of the cache's identity, so a resume never mixes settings)."""

    max_length: int = field(default=256, metadata={"help": "Tokens per text.", "ge": 2})
    batch_tokens: int = field(default=8192, metadata={"help": "Padded tokens per forward batch.", "ge": 1})
    chunk_texts: int = field(default=128, metadata={"help": "Texts between saved (resumable) states.", "ge": 1})
    top_contexts: int = field(default=8, metadata={"help": "Top-activating contexts kept per latent.", "ge": 1})
    window: int = field(default=10, metadata={"help": "Tokens shown each side of an activating token.", "ge": 0})
    lens_tokens: int = field(default=10, metadata={"help": "Promoted and suppressed tokens of the logit lens.", "ge": 1})

    def __post_init__(self) -> None:
        check_config(self)


STATE = "state.safetensors"
META = "meta.json"
DESCRIPTIONS = "descriptions.json"


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, one entry per text (so indices stay the texts'); rendered texts carry their specials."""
    return [list(ids[:max_length]) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


class _ClassTable:
    """Token class of each token id, computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.special = tokenizer, set(getattr(tokenizer, "all_special_ids", []) or [])
        self.known: dict[int, int] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        for i in set(ids.tolist()) - self.known.keys():
            self.known[i] = TOKEN_CLASSES.index(token_class(self.tokenizer.decode([i]), i in self.special))
        return torch.tensor([self.known[i] for i in ids.tolist()], dtype=torch.long)


def _empty_state(m: int, top: int) -> dict[str, torch.Tensor]:
    return {"texts_done": torch.zeros(1, dtype=torch.long), "tokens": torch.zeros(1, dtype=torch.long),
            "active": torch.zeros(m, dtype=torch.long), "mass": torch.zeros(m, dtype=torch.float64),
            "class_mass": torch.zeros(m, len(TOKEN_CLASSES), dtype=torch.float64),
            "hist": torch.zeros(m, BINS, dtype=torch.long), "top_values": torch.zeros(top, m),
            "top_text": torch.full((top, m), -1, dtype=torch.long), "top_position": torch.zeros(top, m, dtype=torch.long)}


def _add_batch(state: dict[str, torch.Tensor], f: torch.Tensor, classes: torch.Tensor, text: torch.Tensor,
               position: torch.Tensor) -> None:
    """Merge one batch of latent activations f (tokens, m) into the running statistics."""
    state["tokens"] += f.shape[0]
    state["active"] += (f > 0).sum(0)
    state["mass"] += f.sum(0).double()
    state["class_mass"] += f.double().T @ torch.nn.functional.one_hot(classes, len(TOKEN_CLASSES)).double()
    rows, latents = f.nonzero(as_tuple=True)
    scaled = (f[rows, latents].log10() - LOG_RANGE[0]) / (LOG_RANGE[1] - LOG_RANGE[0]) * BINS
    bins = scaled.floor().long().clamp(0, BINS - 1)
    state["hist"].view(-1).index_add_(0, latents * BINS + bins, torch.ones_like(bins))
    k = min(state["top_values"].shape[0], f.shape[0])
    values, where = f.topk(k, dim=0)
    all_values = torch.cat([state["top_values"], values])
    all_text = torch.cat([state["top_text"], text[where]])
    all_position = torch.cat([state["top_position"], position[where]])
    best = all_values.topk(state["top_values"].shape[0], dim=0).indices
    state["top_values"] = all_values.gather(0, best)
    state["top_text"] = all_text.gather(0, best)
    state["top_position"] = all_position.gather(0, best)


def _identity(model, sae: SAE, texts: Sequence[str], options: DescribeOptions) -> dict[str, Any]:
    from saealign.models import model_fingerprint

    return {"model_fingerprint": model_fingerprint(model), "sae": sae.fingerprint(), "layer": sae.layer,
            "corpus": text_fingerprint(list(texts)), "texts": len(texts), "options": asdict(options)}


@torch.no_grad()
def collect_statistics(model, tokenizer, sae: SAE, texts: Sequence[str], cache_dir: str | Path,
                       options: DescribeOptions | None = None, progress: bool = True,
                       overwrite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every latent's statistics over `texts`, resuming from `cache_dir` (see the module docstring)."""
    options = options or DescribeOptions()
    cache = Path(cache_dir)
    identity = _identity(model, sae, texts, options)
    if (cache / META).exists() and not overwrite:
        saved = read_json(cache / META)["identity"]
        diffs = [k for k in identity if saved.get(k) != identity[k]]
        if diffs:
            raise ValueError(f"{cache}: holds latent statistics of other settings ({', '.join(diffs)} differ); "
                             "pass --overwrite to start afresh, or use another directory")
    state = load_tensors(cache / STATE) if (cache / STATE).exists() and not overwrite else _empty_state(
        sae.d_sae, options.top_contexts)
    meta = {"identity": identity, "complete": False}
    write_json(cache / META, meta)
    device = next(model.parameters()).device
    sae = sae.to(device)
    classes = _ClassTable(tokenizer)
    start, tokens_before, t0 = int(state["texts_done"]), int(state["tokens"]), time.time()
    bar = tqdm(total=len(texts), initial=start, unit="text", desc=f"describe layer {sae.layer}", disable=not progress)
    for chunk_start in range(start, len(texts), options.chunk_texts):
        sequences = _tokenize(tokenizer, texts[chunk_start: chunk_start + options.chunk_texts], options.max_length)
        for index, ids, mask in padded_batches(sequences, options.batch_tokens, pad_id=0):
            hidden = read_residuals(model, ids.to(device), mask.to(device), [sae.layer])[sae.layer]
            keep = keep_mask(hidden, mask.to(device)).cpu()
            rows, position = keep.nonzero(as_tuple=True)
            f = sae.encode(hidden[keep.to(device)].float()).cpu()
            text = torch.tensor(index)[rows] + chunk_start
            _add_batch(state, f, classes(ids[keep]), text, position)
        state["texts_done"][0] = min(len(texts), chunk_start + options.chunk_texts)
        save_tensors(cache / STATE, state)
        bar.update(int(state["texts_done"]) - bar.n)
    bar.close()
    seconds = time.time() - t0
    meta.update(complete=True, seconds_this_run=round(seconds, 2),
                tokens_per_second=round((int(state["tokens"]) - tokens_before) / seconds, 1) if seconds > 0 else None)
    write_json(cache / META, meta)
    return state, meta


def _quantiles(hist: torch.Tensor, qs: Sequence[float]) -> list[float | None]:
    """Upper edges of the histogram bins holding the quantiles `qs` of the non-zero activations."""
    total = int(hist.sum())
    if total == 0:
        return [None] * len(qs)
    cumulative = hist.cumsum(0).numpy()
    edges = 10 ** np.linspace(*LOG_RANGE, BINS + 1)[1:]
    return [float(edges[int(np.searchsorted(cumulative, q * total))]) for q in qs]


def logit_lens(model, tokenizer, sae: SAE, latents: Sequence[int], n: int, block: int = 256) -> dict[int, dict]:
    """Tokens each latent's decoder direction promotes and suppresses through the unembedding."""
    unembed = model.get_output_embeddings().weight.detach().float().cpu()  # (vocab, d)
    out = {}
    for b0 in range(0, len(latents), block):
        chunk = list(latents[b0: b0 + block])
        logits = sae.W_dec[chunk].detach().float().cpu() @ unembed.T
        top, bottom = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
        for row, j in enumerate(chunk):
            out[j] = {"promoted": [[tokenizer.decode([i]), round(float(v), 4)]
                                   for i, v in zip(top.indices[row].tolist(), top.values[row].tolist())],
                      "suppressed": [[tokenizer.decode([i]), round(-float(v), 4)]
                                     for i, v in zip(bottom.indices[row].tolist(), bottom.values[row].tolist())]}
    return out


def describe(state: dict[str, torch.Tensor], model, tokenizer, sae: SAE, texts: Sequence[str],
             options: DescribeOptions, latents: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """Per latent (all, or `latents`): density, quantiles, contexts, logit lens, token classes, category."""
    latents = list(range(sae.d_sae)) if latents is None else sorted(set(int(j) for j in latents))
    tokens = max(1, int(state["tokens"]))
    lens = logit_lens(model, tokenizer, sae, latents, options.lens_tokens)
    needed = sorted({int(t) for t in state["top_text"][:, latents].flatten().tolist() if t >= 0})
    token_ids = dict(zip(needed, _tokenize(tokenizer, [texts[i] for i in needed], options.max_length)))
    out = {}
    for j in latents:
        mass = state["class_mass"][j]
        shares = {c: float(v) for c, v in zip(TOKEN_CLASSES, (mass / mass.sum()).tolist())} if mass.sum() > 0 else {}
        contexts = []
        for value, text, pos in zip(state["top_values"][:, j].tolist(), state["top_text"][:, j].tolist(),
                                    state["top_position"][:, j].tolist()):
            if value <= 0 or text < 0:
                continue
            ids = token_ids[text]
            lo = max(0, pos - options.window)
            contexts.append({"value": round(value, 4), "text": text, "marked": pos - lo,
                             "tokens": [tokenizer.decode([i]) for i in ids[lo: pos + options.window + 1]]})
        active = int(state["active"][j])
        q50, q90, q99 = _quantiles(state["hist"][j], (0.5, 0.9, 0.99))
        out[j] = {"latent": j, "density": active / tokens, "active_tokens": active,
                  "mean_activation": float(state["mass"][j]) / active if active else 0.0,
                  "quantiles": {"q50": q50, "q90": q90, "q99": q99, "max": contexts[0]["value"] if contexts else 0.0},
                  "token_classes": shares, "category": categorize(shares) if shares else "mixed",
                  "contexts": contexts, "logit_lens": lens[j]}
    return out


def describe_latents(model, tokenizer, sae: SAE, texts: Sequence[str], cache_dir: str | Path,
                     latents: Sequence[int] | None = None, options: DescribeOptions | None = None,
                     progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Collect (or resume) the statistics, describe the latents, and write `cache_dir/descriptions.json`."""
    options = options or DescribeOptions()
    state, meta = collect_statistics(model, tokenizer, sae, texts, cache_dir, options, progress, overwrite)
    result = {"sae": sae.describe(), "layer": sae.layer, "tokens": int(state["tokens"]), "texts": len(texts),
              "tokens_per_second": meta["tokens_per_second"], "options": asdict(options),
              "category_rule": [[c, list(classes), t] for c, classes, t in CATEGORY_RULE],
              "latents": {str(j): d for j, d in describe(state, model, tokenizer, sae, texts, options, latents).items()}}
    write_json(Path(cache_dir) / DESCRIPTIONS, result)
    return result


@dataclass
class DescribeConfig(DescribeOptions, ModelOptions):
    """`saealign sae describe`: activation statistics and descriptions of an SAE's latents."""

    output: str = field(default="", metadata={"help": "Directory for the resumable statistics and descriptions.json."})
    data: str = field(default="", metadata={"help": "Shared data root (HH-RLHF roles and the generic text)."})
    roles: list[str] = field(default_factory=lambda: ["fit", "generic"], metadata={
        "help": "Corpus: data roles and/or `generic` (ARC train, MMLU dev/val, self-instruct seeds); never a test role."})
    sae: str = field(default="default:out", metadata={"help": "SAE whose latents are described."})
    map: Optional[str] = field(default=None, metadata={
        "help": "Describe only the latents of this DSPA map's SAE that have a non-zero entry in its (thresholded) map."})
    latents: list[int] = field(default_factory=list, metadata={"help": "Describe only these latents (repeat)."})
    n: Optional[int] = field(default=2000, metadata={"help": "Describe from a seeded uniform draw of this many texts.", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw."})
    overwrite: bool = field(default=False, metadata={"help": "Start afresh when OUTPUT holds statistics of other settings."})


def map_latents(map_dir: str, sae) -> list[int]:
    """Latents of `sae` (the map's input or output SAE) with a non-zero entry in the thresholded map."""
    from saealign.dspa.map import DSPAMap

    dspa_map = DSPAMap.load(map_dir)
    a = dspa_map.matrix()
    for side, axis in (("sae_out", 0), ("sae_in", 1)):
        if getattr(dspa_map.meta, side)["fingerprint"] == sae.fingerprint():
            return (a != 0).any(axis).nonzero().squeeze(1).tolist()
    raise ValueError(f"{map_dir}: the map was fitted with neither this SAE ({sae.fingerprint()}) as input nor as output")


def run_describe(cfg: DescribeConfig) -> dict[str, Any]:
    """`saealign sae describe`: describe the latents `cfg` selects from a seeded draw of its corpus
    (`describe_latents`' result, also written to `cfg.output`)."""
    from saealign.corpus import sample_texts
    from saealign.models import load_model, load_tokenizer
    from saealign.sae import load_sae

    tokenizer = load_tokenizer(cfg.model)
    texts = sample_texts(corpus_texts(cfg.data, tokenizer, cfg.roles), cfg.n, cfg.seed)
    sae = load_sae(cfg.sae)
    latents = map_latents(cfg.map, sae) if cfg.map else (cfg.latents or None)
    model, _ = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    sae.check_model(model)
    options = DescribeOptions(**{f.name: getattr(cfg, f.name) for f in fields(DescribeOptions)})
    return describe_latents(model, tokenizer, sae, texts, cfg.output, latents, options, overwrite=cfg.overwrite)


# ---------------------------------------------------------------------------------------------------
# The corpus: fit-role dialogues and generic text (SPLITS.md), never a test role

TEST_ROLES = ("test_helpful", "test_harmless", "harmless_all")  # harmless_all holds the harmless test half


def generic_texts(data_dir: str | Path, tokenizer) -> list[str]:
    """SPLITS.md's generic text as chat dialogues: ARC train questions with their answer, MMLU dev/val
    questions with theirs, and the self-instruct seed tasks with their first instance."""
    from saealign.corpus import render_dialogue
    from saealign.data import read_records
    from saealign.eval.mc import load_docs

    root = Path(data_dir)
    pairs = []
    for level in ("Easy", "Challenge"):
        for doc in load_docs("arc_easy", source=str(root / "arc" / f"ARC-{level}" / f"ARC-{level}-Train.jsonl")):
            choices = doc["choices"]
            answer = choices["text"][choices["label"].index(doc["answerKey"])]
            pairs.append((doc["question"] + "\n" + "\n".join(choices["text"]), answer))
    for split in ("dev", "val"):
        for doc in load_docs("mmlu", source=str(root / "mmlu" / "data" / split)):
            pairs.append((doc["question"] + "\n" + "\n".join(doc["choices"]), doc["choices"][doc["answer"]]))
    for _, task in read_records(root / "self-instruct" / "seed_tasks.jsonl"):
        instance = task["instances"][0]
        pairs.append(((task["instruction"] + "\n" + instance["input"]).strip(), instance["output"]))
    return [render_dialogue(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in pairs]


def corpus_texts(data_dir: str | Path, tokenizer, roles: Sequence[str]) -> list[str]:
    """Texts of the data roles (`generic` for generic text); test roles are refused (SPLITS.md)."""
    from saealign.corpus import load_texts

    tested = [role for role in roles if role in TEST_ROLES]
    if tested:
        raise ValueError(f"role {tested[0]!r} is test data: never used for latent descriptions (SPLITS.md)")
    texts = []
    for role in roles:
        texts += generic_texts(data_dir, tokenizer) if role == "generic" else load_texts(str(data_dir), tokenizer, role=role)
    return texts
