"""`saealign dspa fit | tune | merge | info | repe`, `saealign generate`, `saealign chat`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from saealign.cli import app, dspa_app
from saealign.cli._config import config_command, config_flags
from saealign.config import ConfigError
from saealign.dspa.baselines import RepEFitConfig, run_repe_fit
from saealign.dspa.fitting import DSPAFitConfig, run_fit
from saealign.dspa.tune import TuneConfig, run_tune
from saealign.models import DEFAULT_MODEL
from saealign.steering import SteeringOptions

console = Console()


@config_command(dspa_app, "fit", DSPAFitConfig, required=("data", "output"))
def fit(cfg: DSPAFitConfig) -> None:
    """Fit a DSPA map from preference triples (forward passes only; resumable; works under accelerate launch)."""
    dspa_map = run_fit(cfg)
    console.print(f"map over {dspa_map.count} triples -> {cfg.output}  (nnz {dspa_map.a_sum.nnz}, "
                  f"{dspa_map.meta.fit_seconds} s)")


@config_command(dspa_app, "tune", TuneConfig, required=("map", "data"))
def tune(cfg: TuneConfig) -> None:
    """Choose DSPA, static-sae and RepE settings on validation data (one cached base pass, a documented grid)
    and record the sweep and the choice in the map, where `load_method` finds them."""

    def show(entry) -> None:
        m = entry.metrics
        console.print(f"{entry.method} {entry.setting.steering_options()}: reward acc {m['reward_acc']['value']:.3f} "
                      f"margin {m['reward_margin']['value']:+.4f} ({entry.seconds} s)")

    chosen = run_tune(cfg, on_entry=show)
    table = Table(title=f"recorded in {cfg.map} (chosen on {chosen.sweep.data.n} pairs of {cfg.data_role or cfg.data})")
    table.add_column("method")
    table.add_column("setting")
    for method, setting in (("dspa", chosen.dspa), ("static-sae", chosen.static_sae), ("repe", chosen.repe)):
        table.add_row(method, json.dumps(setting.steering_options()))
    console.print(table)


@dspa_app.command("merge")
def merge(maps: list[Path] = typer.Argument(..., help="Map directories fitted on disjoint shards."),
          output: Path = typer.Option(..., "--output", help="Directory for the merged map."),
          allow_overlap: bool = typer.Option(False, help="Merge maps fitted on the same data anyway (its triples count twice).")
          ) -> None:
    """Merge maps exactly (their sums add; counts add). Maps of the same data are refused unless --allow-overlap."""
    from saealign.dspa import DSPAMap, merge_maps

    merged = merge_maps([DSPAMap.load(m) for m in maps], allow_overlap=allow_overlap)
    merged.save(output)
    console.print(f"merged {len(maps)} maps: {merged.count} triples -> {output}")


@dspa_app.command("info")
def info(map_dir: Path = typer.Argument(..., help="A DSPA map directory."),
         top: int = typer.Option(10, help="Show the output latents with the most negative / positive mean scores.")) -> None:
    """What a map belongs to, its size, and the latents it would edit on an average prompt."""
    from saealign.dspa import DSPAMap

    m = DSPAMap.load(map_dir)
    meta = m.meta.to_json()
    if meta["recommended"]["sweep"] is not None:  # every scored setting: `config.json` has them
        meta["recommended"]["sweep"] = f"{len(m.meta.recommended.sweep.entries)} settings scored"
    console.print_json(json.dumps({**meta, "count": m.count, "nnz": m.a_sum.nnz}, default=str))
    scores = m.mean_g() @ m.matrix()
    neg = scores.topk(top, largest=False)
    pos = scores.topk(top)
    table = Table(title="output latents by mean score s = A^T mean g")
    table.add_column("most negative (ablated)")
    table.add_column("most positive (augmented)")
    for (ni, nv), (pi, pv) in zip(zip(neg.indices.tolist(), neg.values.tolist()), zip(pos.indices.tolist(), pos.values.tolist())):
        table.add_row(f"{ni}: {nv:+.4f}", f"{pi}: {pv:+.4f}")
    console.print(table)


@config_command(dspa_app, "repe", RepEFitConfig, required=("data", "output"))
def repe(cfg: RepEFitConfig) -> None:
    """Fit the mean-difference (RepE/CAA) baseline vector from the same triples."""
    vec = run_repe_fit(cfg)
    console.print(f"RepE vector at layer {cfg.layer} (norm {vec.vector.norm():.2f}) -> {cfg.output}")


_METHOD_HELP = "base, prompt-prefix, dspa:MAP_DIR, static-sae:MAP_DIR, repe:DIR, or an artifact directory."


@app.command("generate")
@config_flags(SteeringOptions, "steering")
def generate(prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A user message (repeat for several)."),
             method: str = typer.Option("base", help=_METHOD_HELP),
             compare: bool = typer.Option(False, help="Also show the base model's answer side by side."),
             model: str = typer.Option(DEFAULT_MODEL, help="Model: a `saealign models` alias, a local directory or a hub id."),
             max_new_tokens: int = typer.Option(200, min=1, help="Most tokens per answer."),
             temperature: float = typer.Option(0.0, min=0, help="Sampling temperature (0: greedy)."),
             seed: int = typer.Option(0, help="Sampling seed."),
             show_latents: bool = typer.Option(False, help="List the latents DSPA edited per answer."),
             *, steering: SteeringOptions) -> None:
    """Answer prompts with a method (optionally beside the base model)."""
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.models import load_model
    from saealign.steering import load_method

    mdl, tok = load_model(model)
    options = steering.steering_options()
    if show_latents:
        options["record"] = True
    steer = load_method(method, model=mdl, **options)
    convs = [[{"role": "user", "content": p}] for p in prompt]
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    answers = generate_chat(mdl, tok, convs, sampling, seed=seed, intervention=steer, progress=False)
    base = generate_chat(mdl, tok, convs, sampling, seed=seed, progress=False) if compare and steer is not None else None
    for i, p in enumerate(prompt):
        console.rule(f"[bold]{p}")
        if base is not None:
            console.print(f"[cyan]base:[/cyan] {base[i]}")
        console.print(f"[green]{method}:[/green] {answers[i]}")
    if show_latents and getattr(steer, "records", None) is not None:
        from collections import Counter

        counts = Counter(lat for r in steer.records for lat in r.latents)
        console.print(f"edited {len(steer.records)} token positions; most edited latents: {counts.most_common(12)}")


@app.command("chat")
@config_flags(SteeringOptions, "steering")
def chat(method: str = typer.Option("base", help=_METHOD_HELP + " With --url: a method the server serves."),
         url: str | None = typer.Option(None, help="Talk to a running `saealign serve` (http://HOST:PORT/v1) "
                                                   "instead of loading a model; replies are streamed."),
         api_key_env: str | None = typer.Option(None, help="With --url: send `Bearer $VAR`."),
         compare: bool = typer.Option(False, help="Show the base model's reply beside the steered one."),
         model: str = typer.Option(DEFAULT_MODEL, help="Model: a `saealign models` alias, a local directory or a hub id."),
         max_new_tokens: int = typer.Option(256, min=1, help="Most tokens per reply."),
         temperature: float = typer.Option(0.0, min=0, help="Sampling temperature (0: greedy)."),
         *, steering: SteeringOptions) -> None:
    """Interactive multi-turn chat (empty line or /exit to quit; /reset clears the history)."""
    options = steering.steering_options()
    reply = _remote_replies(url, method, options, api_key_env, max_new_tokens, temperature) if url else \
        _local_replies(model, method, options, max_new_tokens, temperature)
    history: list[dict] = []
    console.print(f"chatting with {url or model} [{method}] — /reset, /exit")
    while True:
        try:
            text = console.input("[bold]you> [/bold]").strip()
        except EOFError:
            break
        if text in ("", "/exit"):
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        if compare and method != "base":
            _show("[cyan]base> [/cyan]", reply(history, False))
        history.append({"role": "assistant", "content": _show(f"[green]{method}> [/green]", reply(history, True))})


def _show(prefix: str, chunks) -> str:
    """Print a reply as its pieces arrive; returns its text."""
    console.print(prefix, end="")
    text = ""
    for chunk in chunks:
        console.print(chunk, end="", markup=False, highlight=False)
        text += chunk
    console.print()
    return text.strip()


def _local_replies(model: str, method: str, options: dict, max_new_tokens: int, temperature: float):
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.models import load_model
    from saealign.steering import load_method

    mdl, tok = load_model(model)
    steer = load_method(method, model=mdl, **options)
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    return lambda history, steered: [generate_chat(mdl, tok, [history], sampling, intervention=steer if steered else None,
                                                   progress=False)[0]]


def _remote_replies(url: str, method: str, options: dict, api_key_env: str | None, max_new_tokens: int,
                    temperature: float):
    """Replies streamed from a server; the steering options travel with each request (`steering`)."""
    import os

    from saealign.serve import stream_chat

    for fixed in ("threshold", "center"):  # they change the method's map, not one request's edits
        if fixed in options:
            raise ConfigError(fixed, f"is fixed per method on a server (register a method with another {fixed})")
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise ValueError(f"--api-key-env {api_key_env}: the variable is not set")

    def reply(history: list[dict], steered: bool):
        body = {"model": method if steered else "base", "messages": history, "max_tokens": max_new_tokens,
                "temperature": temperature, **({"steering": options} if steered and options else {})}
        return stream_chat(url, body, api_key)

    return reply


def _demo_command() -> None:
    from saealign.demo import DemoConfig, run_demo

    @config_command(app, "demo", DemoConfig)
    def demo(cfg: DemoConfig) -> None:
        """The main job: fit DSPA on the default model, show base vs steered answers, edited latents and held-out accuracy."""
        run_demo(cfg, console)


_demo_command()
