"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"]


def build_tiny(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.config.saealign_model_id = f"tiny-{arch}"
    return model.eval()


def save_tiny_chat_model(path: Path, tokenizer) -> Path:
    """A tiny random llama with `tokenizer`'s vocabulary, saved with it as a local model directory (seed 0),
    for tests that go through `load_model(path)` and the CLI."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=["llama", "gemma2", "qwen3"])
def tiny_model(request):
    """The three architectures the brief names; hook tests also loop over ARCHS."""
    return build_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return build_tiny("llama")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (chat template included); converts the GGUF once into the cache."""
    from transformers import AutoTokenizer

    from saealign.models import model_source

    tok = AutoTokenizer.from_pretrained(model_source("smollm2-135m-instruct"))
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


class CharTok:
    """A minimal chat tokenizer for tiny models: characters -> ids, a ChatML-like template."""

    pad_token_id = 0
    eos_token_id = 2
    chat_template = "tiny"
    padding_side = "left"

    def apply_chat_template(self, conversations, tokenize=False, add_generation_prompt=False, **kw):
        single = isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        texts = []
        for conv in convs:
            t = "".join(f"<{m['role'][0]}>{m['content']}|" for m in conv)
            texts.append(t + ("<a>" if add_generation_prompt else ""))
        return texts[0] if single else texts

    def __call__(self, texts, add_special_tokens=False, **kw):
        single = isinstance(texts, str)
        ids = [[3 + (ord(c) % 500) for c in t] for t in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}

    def convert_tokens_to_ids(self, tok):
        return 2

    @property
    def all_special_ids(self):
        return [0, 2]

    def decode(self, ids, **kw):
        return "".join(chr(i) for i in ids)


def char_triples(n=12):
    """Small synthetic preference triples for tiny-model tests."""
    import random

    from saealign.data import PreferenceTriple

    rng = random.Random(0)
    words = ["help", "cook", "math", "poem", "code", "travel", "music", "garden"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(4))
        out.append(PreferenceTriple([{"role": "user", "content": q}], f"sure, {q} answer {i}", f"no {i}"))
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-global state; each test starts (and leaves) it clean, as a new process would."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
