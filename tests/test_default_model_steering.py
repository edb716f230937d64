"""DSPA on the real embedded default model with the shipped SAEs: steering must act during `generate`.

A positive control for the whole generation path (hooks, KV-cache bookkeeping, latent selection): a
decode step mistaken for a new prompt, or a renamed forward argument, makes every edit vanish
silently, and only a test that counts edits and compares answers can see it.
"""

from __future__ import annotations

import pytest

from saealign.demo import DEMO_DATA, DemoConfig

PROMPTS = ["How do I make bread at home?", "Can you explain what inflation is in simple terms?",
           "Write a short poem about the sea.", "What should I pack for a weekend hiking trip?"]


@pytest.mark.integration
def test_dspa_edits_generated_tokens_and_changes_greedy_answers():
    from saealign.data import load_preferences
    from saealign.dspa import DSPA, SteerConfig, fit_map
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.models import load_model
    from saealign.sae import load_sae

    defaults = DemoConfig()
    model, tok = load_model(defaults.model)
    sae_in, sae_out = load_sae(defaults.sae_in), load_sae(defaults.sae_out)
    dspa_map = fit_map(model, tok, sae_in, sae_out, load_preferences(str(DEMO_DATA))[:16], progress=False)
    steer = DSPA(dspa_map, sae_in, sae_out,
                 SteerConfig(alpha=defaults.alpha, k_prompt=defaults.k_prompt, k_diff=defaults.k_diff))
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    sampling = Sampling(max_new_tokens=24)
    base = generate_chat(model, tok, convs, sampling, progress=False)
    steered = generate_chat(model, tok, convs, sampling, intervention=steer, progress=False)
    minus, plus = steer.latent_sets()
    assert minus.any(), "no latent selected for any prompt"
    assert steer.edited_tokens > 0, "DSPA edited no generated token during generate"
    assert steer.edited_tokens <= len(PROMPTS) * 23  # generated positions only (the first comes from the prompt)
    assert sum(b != s for b, s in zip(base, steered)) >= 1, "DSPA changed no greedy answer"
    assert generate_chat(model, tok, convs, sampling, progress=False) == base  # steering is gone afterwards
