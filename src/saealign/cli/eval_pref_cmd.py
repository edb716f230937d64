"""`saealign eval pref` — judge-free held-out preference metrics for several methods at once."""

from __future__ import annotations

from rich.console import Console

from saealign.cli import eval_app
from saealign.cli._config import config_command
from saealign.eval.pref import PrefEvalConfig, markdown_table, run_pref_eval

console = Console()


@config_command(eval_app, "pref", PrefEvalConfig, required=("data",))
def pref(cfg: PrefEvalConfig) -> None:
    """Preference accuracy and reward accuracy vs the base model, with bootstrap intervals."""
    console.print(markdown_table(run_pref_eval(cfg), cfg.data_role or cfg.data))
