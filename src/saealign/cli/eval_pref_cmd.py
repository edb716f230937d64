"""`saealign eval pref` — judge-free held-out preference metrics for several methods at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from saealign.cli import eval_app
from saealign.cli._config import config_command

console = Console()


@dataclass
class PrefEvalConfig:
    data: str = field(default="", metadata={"help": "Held-out triples: a file, HF name, or HH-RLHF directory (with --data-role)."})
    data_role: str | None = field(default=None, metadata={"help": "Role when --data is an HH-RLHF directory (validation, test_helpful, test_harmless)."})
    methods: list[str] = field(default_factory=lambda: ["base"], metadata={"help": "Methods: base, prompt-prefix, dspa:MAP, static-sae:MAP, repe:DIR|MAP (repeat); NAME=SPEC names a column."})
    n: int | None = field(default=None, metadata={"help": "A fixed seeded sample of n triples (stratified by subset)."})
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    max_length: int = 1024
    n_boot: int = 2000
    alpha: float | None = None
    k_prompt: int | None = None
    k_diff: int | None = None
    mode: str | None = None
    threshold: float | None = None
    coef: float | None = field(default=None, metadata={"help": "RepE coefficient override."})
    output: str | None = field(default=None, metadata={"help": "Write results.json and results.md into this directory."})
    dtype: str | None = None
    device: str | None = None


def split_method_entry(entry: str) -> tuple[str, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC -> ("", SPEC). Only an `=` before the first `:` names
    the column, so paths may contain `=`."""
    head = entry.split(":", 1)[0]
    if "=" in head:
        name, _, spec = entry.partition("=")
        return name, spec
    return "", entry


def run_pref_eval(cfg: PrefEvalConfig, model=None, tokenizer=None) -> dict:
    from saealign._io import write_json
    from saealign.data import select_triples
    from saealign.eval import versions
    from saealign.eval.pref import evaluate_preferences, markdown_table, sample_pairs
    from saealign.models import load_model
    from saealign.steering import load_method

    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    triples = sample_pairs(select_triples(cfg.data, cfg.data_role), cfg.n, cfg.seed)
    steer_opts = {k: getattr(cfg, k) for k in ("alpha", "k_prompt", "k_diff", "mode", "threshold") if getattr(cfg, k) is not None}
    methods = {}
    for entry in cfg.methods:
        name, spec = split_method_entry(entry)
        kind = spec.split(":", 1)[0]
        opts = steer_opts if kind in ("dspa", "static-sae") else ({"coef": cfg.coef} if kind == "repe" and cfg.coef is not None else {})
        methods[name or spec] = load_method(spec, model=model, **opts)
    result = evaluate_preferences(model, tokenizer, triples, methods, cfg.max_length, cfg.n_boot, cfg.seed)
    result.update({"config": cfg.__dict__, "versions": versions(), "data": {"source": cfg.data, "role": cfg.data_role,
                                                                             "split_seed": 0, "sample_seed": cfg.seed}})
    if cfg.output:
        out = Path(cfg.output)
        write_json(out / "results.json", result)
        (out / "results.md").write_text(markdown_table(result, f"{cfg.data_role or cfg.data}", legend=True))
    return result


@config_command(eval_app, "pref", PrefEvalConfig, required=("data",))
def pref(cfg: PrefEvalConfig) -> None:
    """Preference accuracy and reward accuracy vs the base model, with bootstrap intervals."""
    from saealign.eval.pref import markdown_table

    console.print(markdown_table(run_pref_eval(cfg), cfg.data_role or cfg.data))
