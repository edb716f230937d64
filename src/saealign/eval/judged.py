"""The options the judged generation benchmarks share (`eval mt-bench`, `eval alpaca-eval`): which policy
answers (`PolicyOptions`), who judges (`JudgeOptions`), and how the answers are drawn, generated and written
(`GenerationOptions`). Each benchmark's config extends `JudgedBenchmarkConfig` with its own data and judge mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saealign.eval.judges import JudgeOptions
from saealign.steering import PolicyOptions


@dataclass
class GenerationOptions:
    """How a judged benchmark draws its prompts, generates its outputs and where it writes them."""

    output: Path | None = field(default=None, metadata={
        "help": "Directory for the outputs, judgments, judge cache, config.json and results.json; a rerun "
                "resumes from what is there (and is refused if the generation settings changed)."})
    n: int | None = field(default=None, metadata={
        "help": "Evaluate a seeded uniform draw of this many prompts, kept in file order (default: all).", "ge": 1})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the draw of n prompts."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "Generation seeds: one output per prompt and seed (repeat the flag for several)."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens generated per output.", "ge": 1})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated per forward pass.", "ge": 1})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


@dataclass
class JudgedBenchmarkConfig(PolicyOptions, JudgeOptions, GenerationOptions):
    """A policy answers a drawn set of prompts; a judge grades the answers."""
