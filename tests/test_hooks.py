"""Residual hooks: layer convention, identity edits, padding and KV-cache behaviour."""

import pytest
import torch

from conftest import ARCHS, build_tiny
from saealign.hooks import CallContext, HookSession, attach, edit_residual, parse_hook_name, read_residuals


@pytest.mark.parametrize("arch", ARCHS)
def test_read_equals_hidden_states_plus_one(arch):
    model = build_tiny(arch)
    ids = torch.randint(3, 500, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    layers = [0, 1, 2]  # the last block's hidden_states entry is after the final norm in some models
    got = read_residuals(model, ids, mask, layers)
    for layer in layers:
        torch.testing.assert_close(got[layer], hs[layer + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(got[layer], hs[layer]), "off by one: matched hidden_states[l]"


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_pre_is_previous_layer_output(arch):
    model = build_tiny(arch)
    ids = torch.randint(3, 500, (1, 6))
    post = read_residuals(model, ids, None, [1])[1]
    pre = read_residuals(model, ids, None, [2], site="resid_pre")[2]
    torch.testing.assert_close(pre, post, rtol=0, atol=1e-6)


def test_hook_names():
    assert parse_hook_name("blocks.7.hook_resid_post") == (7, "resid_post")
    assert parse_hook_name("blocks.24.hook_out") == (24, "resid_post")
    assert parse_hook_name("blocks.3.hook_resid_pre") == (3, "resid_pre")
    assert parse_hook_name("model.layers.12") == (12, "resid_post")
    assert parse_hook_name("model.language_model.layers.5") == (5, "resid_post")
    with pytest.raises(ValueError, match="unsupported hook name"):
        parse_hook_name("blocks.3.attn.hook_z")


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_edit_is_bit_exact(arch):
    model = build_tiny(arch)
    ids = torch.randint(3, 500, (2, 8))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with edit_residual(model, 1, lambda h, ctx: h.clone(), positions="all"):
            edited = model(input_ids=ids).logits
    assert torch.equal(clean, edited)


def test_edit_changes_only_masked_positions(tiny_llama):
    ids = torch.randint(3, 500, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 5] = True
    with torch.no_grad():
        clean = read_residuals(tiny_llama, ids, None, [2])[2]
        with edit_residual(tiny_llama, 1, lambda h, ctx: h + 1.0, positions=mask):
            edited = read_residuals(tiny_llama, ids, None, [2])[2]
    assert torch.equal(clean[0, :5], edited[0, :5]), "a causal edit at t=5 leaked backwards"
    assert not torch.equal(clean[0, 5:], edited[0, 5:])
    assert torch.equal(clean[1], edited[1])


def test_handle_remove(tiny_llama):
    ids = torch.randint(3, 500, (1, 5))
    with torch.no_grad():
        clean = tiny_llama(input_ids=ids).logits
        handle = attach(tiny_llama, {1: lambda h, ctx: h * 2}, positions="all")
        assert not torch.equal(tiny_llama(input_ids=ids).logits, clean)
        handle.remove()
        assert torch.equal(tiny_llama(input_ids=ids).logits, clean)


def _left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


_DIRECTION = torch.randn(64, generator=torch.Generator().manual_seed(0))


def _shift_generated(h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
    """A strong, token-dependent edit (scaled by each token's own norm)."""
    return h + 3.0 * _DIRECTION * h.norm(dim=-1, keepdim=True) / 8.0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_batched_left_padded_generation_equals_one_by_one(arch):
    model = build_tiny(arch)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (4, 7, 5)]
    ids, mask = _left_pad(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), edit_residual(model, 2, _shift_generated, positions="generation"):
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
        singles = [model.generate(input_ids=torch.tensor([p]), **kwargs)[0, len(p):] for p in prompts]
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)
    assert not torch.equal(batched, plain), "the edit had no effect; the test would prove nothing"


def test_kv_cache_equals_no_cache(tiny_llama):
    ids = torch.randint(3, 500, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), edit_residual(tiny_llama, 1, _shift_generated, positions="generation"):
        cached = tiny_llama.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = tiny_llama.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_prompt_positions_untouched_during_generation(tiny_llama):
    seen = []

    def record(h, ctx):
        seen.append((ctx.is_prefill, ctx.mask.clone()))
        return h

    ids = torch.randint(3, 500, (1, 5))
    with torch.no_grad(), edit_residual(tiny_llama, 0, record, positions="generation"):
        tiny_llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen[0][0] and not seen[0][1].any(), "prefill positions were selected for editing"
    assert all(m.all() for prefill, m in seen[1:]) and len(seen) == 3


def test_session_resets_between_generations(tiny_llama):
    prompt_lens = []
    session = HookSession(tiny_llama)
    session.add(0, lambda h, ctx: prompt_lens.append(ctx.prompt_len))
    with session, torch.no_grad():
        tiny_llama.generate(input_ids=torch.randint(3, 500, (1, 4)), max_new_tokens=2, do_sample=False, pad_token_id=0)
        tiny_llama.generate(input_ids=torch.randint(3, 500, (1, 7)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert prompt_lens == [4, 4, 7, 7]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_no_decode_step_is_taken_for_a_new_prompt(arch, use_cache):
    """Each `generate` is one prefill, then continuations whose past length grows by one token a step
    (with the KV cache). A decode step mistaken for a new prompt would make every steering method
    recompute its prompt features from one generated token and edit nothing."""
    model = build_tiny(arch)
    seen = []
    session = HookSession(model)
    session.add(1, lambda h, ctx: seen.append((ctx.is_prefill, ctx.past_len, ctx.prompt_len, h.shape[1])))
    ids, mask = _left_pad([[5, 6, 7, 8, 9], [11, 12, 13]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache)
    with session, torch.no_grad():
        for _ in range(2):
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert session.prefill_calls == 2 and session.continued_calls == 6
    for run in (seen[:4], seen[4:]):
        assert run[0] == (True, 0, 5, 5)
        assert all(not prefill and prompt_len == 5 for prefill, _, prompt_len, _ in run[1:])
        if use_cache:
            assert [(past, seq) for _, past, _, seq in run[1:]] == [(5, 1), (6, 1), (7, 1)]


def test_past_length_from_the_cache_object(tiny_llama):
    """The past length comes from the cache object whatever keyword carries it (`cache` or
    `past_key_values`, by the running transformers), never from a keyword's name."""
    from saealign.models import cache_argument, returned_cache

    ids = torch.randint(3, 500, (1, 6))
    seen = []
    session = HookSession(tiny_llama)
    session.add(0, lambda h, ctx: seen.append((ctx.is_prefill, ctx.past_len)))
    with session, torch.no_grad():
        out = tiny_llama(input_ids=ids, use_cache=True)
        cache = returned_cache(out)
        tiny_llama(input_ids=ids[:, :1], attention_mask=torch.ones(1, 7, dtype=torch.long),
                   use_cache=True, **cache_argument(tiny_llama, cache))
        tiny_llama(input_ids=ids[:, :2], use_cache=False)  # a new, unrelated prompt
    assert seen == [(True, 0), (False, 6), (True, 0)]
