"""`saealign models`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from saealign.cli import app
from saealign.models import alias_status


@app.command("models")
def models() -> None:
    """List the built-in model aliases, where each comes from and whether it is installed."""
    rows = alias_status()
    table = Table(title="saealign model aliases (any HF hub id or local directory works too)")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(v)) for v in row.values()))  # '[gemma3]' is text, not markup
    Console().print(table)
