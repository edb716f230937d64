"""`saealign sae suite`: the default model's SAE suite, reproducible by one command (issue #17).

TopK SAEs at several depths, each in two variants, for the layer-pair, SAE-type and width ablations:

- *generic*: trained from scratch on SPLITS.md's generic text (no preference data);
- *preference*: the generic SAE of the same layer and width fine-tuned on fit-pool dialogues
  (`init_from`), as the DSPA paper builds its preference-domain SAE.

Each corpus is extracted **once**, every layer in the same forward pass per batch, into an on-disk
`ActivationCache`; every SAE of that variant (all layers, all widths) trains from it. Every SAE is then
scored by `evaluate_sae` on held-out validation-role dialogues (never a test role) against the
shipped SAEs' quality bar, and `OUTPUT/suite.json` and `OUTPUT/suite.md` are rewritten after each one.

Layout of OUTPUT: `generic/layer_L_wW/` and `preference/layer_L_wW/` (SAELens folders, with their
`train_log.jsonl`), `activations/<variant>/` while that variant still has SAEs to train (deleted
after), `suite.json`, `suite.md`. A rerun resumes: finished SAEs are skipped, an interrupted SAE
continues from its checkpoint, an interrupted extraction from its last chunk. A rerun with other
settings is refused, except for the bar thresholds, the device and `variants`, which change no SAE (the bar
flags are recomputed; `--variants generic` trains the generic SAEs alone, and rows of SAEs a run leaves out
stay recorded).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saealign._io import atomic_path, read_json, write_json
from saealign.audit.describe import TEST_ROLES, corpus_texts
from saealign.config import ConfigError, check_config, differing_settings
from saealign.models import Dtype, ModelOptions

log = logging.getLogger(__name__)

Variant = Literal["generic", "preference"]
VARIANTS: tuple[Variant, ...] = ("generic", "preference")
BAR_METRICS = ("fvu", "dead_fraction", "loss_increase")
UNSETTLED = ("output", "device", "variants", "max_fvu", "max_dead_fraction", "max_loss_increase")  # change no SAE


@dataclass
class SAESuiteConfig(ModelOptions):
    """`saealign sae suite`: which SAEs the suite holds, on which data, and the bar each must meet."""

    data: str = field(default="", metadata={"help": "Shared data root (../shared/data): the generic text and the HH-RLHF roles."})
    output: str = field(default="", metadata={"help": "Suite directory: the SAEs, suite.json and suite.md; a rerun resumes from it."})
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12, 18, 24, 27], metadata={
        "help": "Residual layers (block outputs) that get an SAE of each variant.", "ge": 0})
    widths: list[int] = field(default_factory=lambda: [2560], metadata={
        "help": "Latents of the SAEs trained at every layer (2560: the shipped output SAE's width).", "ge": 1})
    wide_layers: list[int] = field(default_factory=list, metadata={
        "help": "Layers (of --layers) that also get SAEs of --wide-width latents, for the width ablation.", "ge": 0})
    wide_width: int = field(default=8192, metadata={"help": "Latents of the extra SAEs at --wide-layers.", "ge": 1})
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "Variants to train: `generic` alone skips the preference-domain fine-tunes (a rerun with both adds them)."})
    k: int = field(default=96, metadata={
        "help": "Active latents per token (TopK) of every SAE; 96 met the bar at layer 24 where 64 did not.", "ge": 1})
    generic_roles: list[str] = field(default_factory=lambda: ["generic"], metadata={
        "help": "Corpus of the generic SAEs: `generic` (ARC train, MMLU dev/val, self-instruct seeds) and/or data roles."})
    preference_role: str = field(default="fit", metadata={"help": "Data role of the preference-domain fine-tuning dialogues."})
    eval_role: str = field(default="validation", metadata={"help": "Held-out data role every SAE is scored on."})
    generic_n: int | None = field(default=None, metadata={
        "help": "Train the generic SAEs on a seeded uniform draw of this many texts (default: all, ~560k tokens).", "ge": 1})
    preference_n: int | None = field(default=2000, metadata={
        "help": "Fine-tune on a seeded uniform draw of this many dialogues (2000: ~570k tokens, as many as the generic text).",
        "ge": 1})
    eval_n: int | None = field(default=100, metadata={
        "help": "Score each SAE on a seeded uniform draw of this many dialogues (100: as the README's shipped SAEs).", "ge": 1})
    epochs: float = field(default=8.0, metadata={"help": "Passes over the generic activations.", "gt": 0})
    finetune_epochs: float = field(default=4.0, metadata={"help": "Passes over the preference activations when fine-tuning.", "gt": 0})
    batch_size: int = field(default=4096, metadata={"help": "Tokens per optimizer step.", "ge": 1})
    batch_tokens: int = field(default=8192, metadata={"help": "Padded tokens per forward pass (extraction and scoring).", "ge": 1})
    max_length: int = field(default=512, metadata={"help": "Tokens per text (longer texts are cut).", "ge": 1})
    dtype: Dtype | None = field(default="float32", metadata={
        "help": "Dtype the model is loaded in for extraction and scoring (default float32 on every device, so metrics are comparable)."})
    seed: int = field(default=0, metadata={"help": "Seed of the --*-n draws, the SAE initialisation and the shuffle."})
    max_fvu: float = field(default=0.15, metadata={"help": "Quality bar: highest fraction of variance unexplained.", "ge": 0})
    max_dead_fraction: float = field(default=0.05, metadata={"help": "Quality bar: highest fraction of latents that never fire.",
                                                             "ge": 0, "le": 1})
    max_loss_increase: float = field(default=0.25, metadata={"help": "Quality bar: highest next-token loss increase (nats) "
                                                                     "with the reconstruction spliced in.", "ge": 0})

    def __post_init__(self) -> None:
        check_config(self)
        if sorted(set(self.layers)) != sorted(self.layers):
            raise ConfigError("layers", f"must not repeat a layer, got {self.layers}")
        outside = sorted(set(self.wide_layers) - set(self.layers))
        if outside:
            raise ConfigError("wide_layers", f"must be among --layers {self.layers}; {outside} is not")
        narrowest = min([*self.widths, *([self.wide_width] if self.wide_layers else [])], default=self.k)
        if self.k > narrowest:
            raise ConfigError("k", f"must be <= the narrowest width ({narrowest}), got {self.k}")
        for name in ("generic_roles", "preference_role", "eval_role"):
            tested = [role for role in _as_list(getattr(self, name)) if role in TEST_ROLES]
            if tested:
                raise ConfigError(name, f"must not be a test role (SPLITS.md: held-out numbers only), got {tested[0]!r}")
        if "generic" not in self.variants:
            raise ConfigError("variants", f"must include generic (the preference-domain SAEs are fine-tuned from it), got {self.variants}")
        if self.eval_role in (*self.generic_roles, self.preference_role):
            raise ConfigError("eval_role", f"must be held out from training, but {self.eval_role!r} is a training corpus")

    def bar(self) -> dict[str, float]:
        """The highest value of each bar metric."""
        return {"fvu": self.max_fvu, "dead_fraction": self.max_dead_fraction, "loss_increase": self.max_loss_increase}

    def settings(self) -> dict[str, Any]:
        """What the suite's SAEs depend on: a resumed output must hold the same."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in UNSETTLED}


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True)
class SuiteEntry:
    """One SAE of the suite."""

    variant: Variant
    layer: int
    width: int

    @property
    def name(self) -> str:
        """Its folder under the output directory, and its key in suite.json."""
        return f"{self.variant}/layer_{self.layer}_w{self.width}"

    @property
    def generic(self) -> SuiteEntry:
        """The generic SAE a preference-domain SAE is fine-tuned from."""
        return dataclasses.replace(self, variant="generic")


def suite_entries(cfg: SAESuiteConfig) -> list[SuiteEntry]:
    """Every SAE of the suite: each variant at every (layer, width), generic ones first (they seed the others);
    within a variant the wide SAEs come last, so an interrupted run already holds every layer at --widths."""
    pairs = sorted((layer, width) for layer in cfg.layers for width in cfg.widths)
    pairs += [(layer, cfg.wide_width) for layer in sorted(cfg.wide_layers) if cfg.wide_width not in cfg.widths]
    return [SuiteEntry(variant, layer, width) for variant in VARIANTS if variant in cfg.variants for layer, width in pairs]


def run_suite(cfg: SAESuiteConfig) -> dict[str, Any]:
    """Train, score and record every SAE of the suite that `cfg.output` does not hold yet; returns suite.json's content."""
    if not cfg.data or not cfg.output:
        raise ValueError("sae suite needs --data and --output")
    out = Path(cfg.output)
    report = _open_report(out, cfg)
    entries = suite_entries(cfg)
    _write_report(out, report, cfg, entries)  # settings first: an interrupted extraction is resumed only by the same settings
    todo = [entry for entry in entries if entry.name not in report["saes"]]
    if todo:
        _SuiteRun(cfg, out, report).run(todo, entries)
    return _write_report(out, report, cfg, entries)


def _open_report(out: Path, cfg: SAESuiteConfig) -> dict[str, Any]:
    """The suite.json of an earlier run in `out` (refused if it has other settings), or a fresh one."""
    path = out / "suite.json"
    if not path.exists():
        return {"settings": cfg.settings(), "model_fingerprint": None, "extraction": {}, "saes": {}}
    report = read_json(path)
    report["saes"] = {row["name"]: row for row in report["saes"]}
    _refuse_other_settings(out, report["settings"], cfg.settings())
    return report


def _refuse_other_settings(out: Path, have: dict[str, Any], want: dict[str, Any], unrecorded_agree: bool = False) -> None:
    detail = differing_settings(have, want, unrecorded_agree)
    if detail:
        raise ValueError(f"{out}: holds an SAE suite built with other settings ({detail}); "
                         "use another output directory")


class _SuiteRun:
    """The work of one invocation: loads the model once, extracts each corpus at most once, trains and scores."""

    def __init__(self, cfg: SAESuiteConfig, out: Path, report: dict[str, Any]):
        from saealign.corpus import sample_texts
        from saealign.models import load_model, load_tokenizer, model_fingerprint, resolve_device

        self.cfg, self.out, self.report = cfg, out, report
        self.device = resolve_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.eval_texts = sample_texts(corpus_texts(cfg.data, self.tokenizer, [cfg.eval_role]), cfg.eval_n, cfg.seed)
        self.model, _ = load_model(cfg.model, device=self.device, dtype=cfg.dtype)  # after the data passed its checks
        self.fingerprint = model_fingerprint(self.model)
        _refuse_other_settings(out, {"model_fingerprint": report["model_fingerprint"]}, {"model_fingerprint": self.fingerprint},
                               unrecorded_agree=True)  # none recorded: the first run was cut off before its model loaded
        report["model_fingerprint"] = self.fingerprint

    def run(self, todo: list[SuiteEntry], entries: list[SuiteEntry]) -> None:
        done = len(entries) - len(todo)
        for variant in VARIANTS:
            of_variant = [entry for entry in todo if entry.variant == variant]
            untrained = [entry for entry in of_variant if not _saved(self.out / entry.name)]
            cache = self._activations(variant) if untrained else None
            for entry in of_variant:
                done += 1
                log.info("[%d/%d] %s", done, len(entries), entry.name)
                train_seconds = self._train(entry, cache) if entry in untrained else None
                self._score(entry, train_seconds)
                _write_report(self.out, self.report, self.cfg, entries)
            if cache is not None:  # every SAE of this variant is saved: a rerun never reads these again
                shutil.rmtree(cache.dir)

    def _activations(self, variant: Variant):
        """The variant's corpus extracted once, all layers per forward pass (reused when already complete)."""
        from saealign.activations import ActivationCache, tokenize_texts
        from saealign.corpus import sample_texts
        from saealign.hooks import hidden_size

        cfg = self.cfg
        cache = ActivationCache(self.out / "activations" / variant, cfg.layers, hidden_size(self.model))
        if not cache.meta["complete"]:
            roles, n = (cfg.generic_roles, cfg.generic_n) if variant == "generic" else ([cfg.preference_role], cfg.preference_n)
            texts = sample_texts(corpus_texts(cfg.data, self.tokenizer, roles), n, cfg.seed)
            started = time.time()
            stats = cache.fill(self.model, tokenize_texts(self.tokenizer, texts, cfg.max_length), cfg.batch_tokens)
            cache.meta["extraction"] = {"texts": len(texts), "tokens_seen": stats.tokens_seen,
                                        "tokens_kept": stats.tokens_kept, "seconds": round(time.time() - started, 1)}
            write_json(cache.meta_path, cache.meta)
            log.info("%s activations: %s", variant, cache.meta["extraction"])
        self.report["extraction"][variant] = cache.meta["extraction"]
        return cache

    def _train(self, entry: SuiteEntry, cache) -> float:
        """Train (or resume) one SAE from the variant's activations and save it; returns the seconds it took."""
        from saealign.sae.train import SAETrainConfig, train_layer

        cfg = self.cfg
        sae_dir = self.out / entry.name
        sae_dir.mkdir(parents=True, exist_ok=True)
        preference = entry.variant == "preference"
        train_cfg = SAETrainConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, layers=[entry.layer],
                                   d_sae=entry.width, k=cfg.k, batch_size=cfg.batch_size,
                                   epochs=cfg.finetune_epochs if preference else cfg.epochs, max_length=cfg.max_length,
                                   batch_tokens=cfg.batch_tokens, seed=cfg.seed,
                                   init_from=str(self.out / entry.generic.name) if preference else None)
        sae = train_layer(train_cfg, cache, entry.layer, sae_dir, self.device, self.fingerprint, suite={
            "variant": entry.variant, "data": cfg.data, "roles": [cfg.preference_role] if preference else cfg.generic_roles,
            "n": cfg.preference_n if preference else cfg.generic_n, "init_from": entry.generic.name if preference else None})
        (sae_dir / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state: only needed to resume
        seconds = sae.cfg.metadata["train_seconds"]
        log.info("%s trained in %.0f s (%d steps)", entry.name, seconds, sae.cfg.metadata["steps"])
        return seconds

    def _score(self, entry: SuiteEntry, train_seconds: float | None) -> None:
        """Score a saved SAE on the held-out dialogues and record its row."""
        from saealign.sae import load_sae
        from saealign.sae.evaluate import evaluate_sae

        sae = load_sae(self.out / entry.name)
        sae.check_model(self.model)
        started = time.time()
        result = evaluate_sae(sae, self.model, self.tokenizer, self.eval_texts, max_length=self.cfg.max_length,
                              batch_tokens=self.cfg.batch_tokens)
        metrics = {name: estimate.value for name, estimate in result.estimates().items()}
        self.report["saes"][entry.name] = {
            "name": entry.name, "variant": entry.variant, "layer": entry.layer, "width": entry.width, "k": sae.cfg.k,
            "path": entry.name, "fingerprint": sae.fingerprint(),
            "init_from": entry.generic.name if entry.variant == "preference" else None,
            "metrics": {**metrics, "texts": result.texts, "tokens": result.tokens},
            "seconds": {"train": train_seconds if train_seconds is not None else sae.cfg.metadata.get("train_seconds"),
                        "eval": round(time.time() - started, 1)}}
        log.info("%s: FVU %.3f, dead %.3f, loss increase %.3f", entry.name, metrics["fvu"], metrics["dead_fraction"],
                 metrics["loss_increase"])


def _saved(sae_dir: Path) -> bool:
    """`SAE.save` writes cfg.json last, so its presence means the SAE is complete."""
    return (sae_dir / "cfg.json").exists()


def _bar_flags(metrics: dict[str, float], bar: dict[str, float]) -> dict[str, bool]:
    return {name: metrics[name] <= bar[name] for name in BAR_METRICS}


def _write_report(out: Path, report: dict[str, Any], cfg: SAESuiteConfig, entries: list[SuiteEntry]) -> dict[str, Any]:
    """Write suite.json (returned: its rows in suite order, then rows of SAEs this run leaves out, e.g. another
    --variants) and suite.md, each atomically; bar flags follow the current thresholds."""
    names = [entry.name for entry in entries]
    rows = [report["saes"][name] for name in names if name in report["saes"]]
    recorded = rows + [row for name, row in report["saes"].items() if name not in names]
    for row in recorded:
        row["bar"] = _bar_flags(row["metrics"], cfg.bar())
        row["passes"] = all(row["bar"].values())
    seconds = [part["seconds"] for part in report["extraction"].values()]  # every variant's, so every row's too
    seconds += [value for row in recorded for value in row["seconds"].values() if value is not None]
    report["bar"] = cfg.bar()
    report["total_seconds"] = round(sum(seconds), 1)
    report["variants"] = cfg.variants  # what "complete" refers to (the setting changes no SAE, so it is not a setting)
    report["complete"] = len(rows) == len(entries)
    written = {**report, "saes": recorded}
    write_json(out / "suite.json", written)
    with atomic_path(out / "suite.md") as tmp:
        tmp.write_text(_markdown(report, recorded, len(rows), len(entries)))
    return written


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]], done: int, total: int) -> str:
    bar = report["bar"]
    settings = report["settings"]
    lines = [f"# SAE suite: {settings['model']} (weights {report['model_fingerprint']})", "",
             f"{done} of {total} SAEs done; {report['total_seconds']:.0f} s of extraction, training and scoring "
             f"(each step timed in the run that finished it).",
             f"Scored on {settings['eval_n'] or 'all'} `{settings['eval_role']}` dialogues. Bar: FVU <= {bar['fvu']}, "
             f"dead <= {100 * bar['dead_fraction']:g} %, loss increase <= {bar['loss_increase']} nats.", "",
             "| SAE | variant | layer | latents | k | FVU | L0 | dead % | loss increase (nats) | bar | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, s = row["metrics"], row["seconds"]
        failed = [name.replace("_", " ") for name, ok in row["bar"].items() if not ok]
        lines.append(f"| `{row['name']}` | {row['variant']} | {row['layer']} | {row['width']} | {row['k']} | {m['fvu']:.3f} | "
                     f"{m['l0']:.1f} | {100 * m['dead_fraction']:.1f} | {m['loss_increase']:.3f} | "
                     f"{'pass' if row['passes'] else 'fails ' + ', '.join(failed)} | "
                     f"{'—' if s['train'] is None else round(s['train'])} | {round(s['eval'])} |")
    return "\n".join(lines) + "\n"
