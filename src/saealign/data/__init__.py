"""Preference data: formats and loading (`formats`), seeded draws (`draws`), the fixed data roles of
SPLITS.md (`roles`), and chat rendering and batching (`rendering`). Every method (DSPA fitting, FPO/DPO
training, evaluation) consumes `PreferenceTriple`s, so each source's quirks are resolved here once; the
names below are the package's API.
"""

from saealign.data.formats import (LoadReport, PreferenceDataError, PreferenceTriple, Problem, ROLES, drop_ties,
                                   first_user_turn, load_preferences, local_path, read_lines, read_records,
                                   triples_fingerprint)
from saealign.data.draws import in_draw_order, restrict, sample, select_subset, split_validation, stratified_subset
from saealign.data.roles import (DATA_ROLES, DataRoles, FIT_SUBSETS, HARMLESS_FRACTIONS, HARMLESS_ROLES, HH_SUBSETS,
                                 LEGACY_ROLES, alpaca_eval_instructions, harmless_roles, hh_rlhf_roles,
                                 select_triples, split_harmless)
from saealign.data.rendering import (RenderError, RenderedTriple, collate_pairs, inspect_triples, length_batches,
                                     render_triple, render_triples, with_system_prompt)

__all__ = [
    "DATA_ROLES", "DataRoles", "FIT_SUBSETS", "HARMLESS_FRACTIONS", "HARMLESS_ROLES", "HH_SUBSETS", "LEGACY_ROLES",
    "LoadReport", "PreferenceDataError", "PreferenceTriple", "Problem", "ROLES", "RenderError", "RenderedTriple",
    "alpaca_eval_instructions", "collate_pairs", "drop_ties", "first_user_turn", "harmless_roles", "hh_rlhf_roles",
    "in_draw_order", "inspect_triples", "length_batches", "load_preferences", "local_path", "read_lines",
    "read_records", "render_triple", "render_triples", "restrict", "sample", "select_subset", "select_triples",
    "split_harmless", "split_validation", "stratified_subset", "triples_fingerprint", "with_system_prompt",
]
