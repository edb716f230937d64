"""`saealign serve`: an OpenAI-compatible endpoint serving the base model and steered methods side by side."""

from __future__ import annotations

from rich.console import Console

from saealign.cli import app
from saealign.cli._config import config_command
from saealign.serve import ServeConfig, build_server


@config_command(app, "serve", ServeConfig)
def serve(cfg: ServeConfig) -> None:
    """Serve at http://HOST:PORT/v1 (chat/completions, completions, models; /health, /metrics); Ctrl-C stops.

    A request picks its method with `model` (the served name, `base`, or a --method NAME) and its own
    settings with `steering` ({"alpha": .., "k_diff": .., "mode": ..}); all methods share one batch."""
    server = build_server(cfg)
    Console().print(f"serving [bold]{server.model_name}[/bold] at {server.url}; methods: {', '.join(server.methods)}")
    server.serve_forever()
