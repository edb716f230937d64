"""`saealign eval pref` — judge-free held-out preference metrics for several methods at once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from saealign.cli import eval_app
from saealign.cli._config import config_command
from saealign.config import ConfigError, check_config
from saealign.steering import SteeringOptions, load_method, method_kind, method_options, split_method_entry

if TYPE_CHECKING:
    from saealign.results import ResultRecord

console = Console()


@dataclass
class PrefEvalConfig(SteeringOptions):
    """`eval pref`: the steering knobs (each method gets those it takes) and what to score."""

    data: str = field(default="", metadata={"help": "Held-out triples: a file, HF name, or HH-RLHF directory (with --data-role)."})
    data_role: str | None = field(default=None, metadata={"help": "Role when --data is an HH-RLHF directory (SPLITS.md): validation, test_helpful, harmless_validation, test_harmless (the test half of harmless-base), harmless_all (all of it: published pre-split numbers), or a fit role."})
    methods: list[str] = field(default_factory=lambda: ["base"], metadata={"help": "Methods: base, prompt-prefix, dspa:MAP, static-sae:MAP, repe:DIR|MAP (repeat); NAME=SPEC names a column."})
    n: int | None = field(default=None, metadata={"help": "A fixed seeded sample of n triples (stratified by subset).", "ge": 1})
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    max_length: int = field(default=1024, metadata={"ge": 1})
    n_boot: int = field(default=2000, metadata={"ge": 1})
    output: str | None = field(default=None, metadata={"help": "Write results.json and results.md into this directory."})
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        check_config(self)
        kinds = [method_kind(split_method_entry(entry)[1]) for entry in self.methods]
        for option in self.steering_options():
            if not any(option in method_options(kind) for kind in kinds):
                raise ConfigError(option, f"is given, but none of the methods takes it ({', '.join(self.methods)})")


def run_pref_eval(cfg: PrefEvalConfig, model=None, tokenizer=None) -> list[ResultRecord]:
    from saealign.data import select_triples
    from saealign.eval.pref import evaluate_preferences, markdown_table, sample_pairs
    from saealign.models import load_model
    from saealign.results import write_results

    available = select_triples(cfg.data, cfg.data_role)
    if cfg.n is not None and cfg.n > len(available):
        raise ConfigError("n", f"asks for {cfg.n} triples, but {cfg.data_role or cfg.data} has only {len(available)}")
    triples = sample_pairs(available, cfg.n, cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    methods = {}
    for entry in cfg.methods:
        name, spec = split_method_entry(entry)
        takes = method_options(method_kind(spec))
        methods[name or spec] = load_method(spec, model=model, **{k: v for k, v in cfg.steering_options().items() if k in takes})
    result = evaluate_preferences(model, tokenizer, triples, methods, cfg.max_length, cfg.n_boot, cfg.seed)
    provenance = {"source": cfg.data, "role": cfg.data_role, "split_seed": 0, "sample_seed": cfg.seed}
    result = [replace(r, benchmark=f"pref:{cfg.data_role or 'triples'}", config=cfg.__dict__,
                      data={**r.data, **provenance}) for r in result]
    if cfg.output:
        out = Path(cfg.output)
        write_results(out / "results.json", result)
        (out / "results.md").write_text(markdown_table(result, f"{cfg.data_role or cfg.data}", legend=True))
    return result


@config_command(eval_app, "pref", PrefEvalConfig, required=("data",))
def pref(cfg: PrefEvalConfig) -> None:
    """Preference accuracy and reward accuracy vs the base model, with bootstrap intervals."""
    from saealign.eval.pref import markdown_table

    console.print(markdown_table(run_pref_eval(cfg), cfg.data_role or cfg.data))
