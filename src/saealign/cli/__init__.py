"""The `saealign` command line: a thin layer over the Python API.

Each capability module registers its commands on the shared apps below.
"""

from __future__ import annotations

import logging

import click
import typer
from typer.core import TyperGroup

USER_ERRORS = (ValueError, OSError, KeyError)  # bad input, missing files: a message, not a traceback


class _Group(TyperGroup):
    """Turns a user error raised by a command into one `error:` line (plus a hint) and exit code 2;
    `saealign -v` re-raises it for the full traceback. Typer's usage errors pass through untouched."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        ctx.meta["saealign.command"] = f"{ctx.command_path} {name}"  # meta is shared: the innermost command wins
        return name, cmd, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as err:
            from saealign.config import ConfigError
            from saealign.eval.judges import JudgeError  # an endpoint's refusal (bad key, unknown model)

            if not isinstance(err, (*USER_ERRORS, JudgeError)) or ctx.find_root().params.get("verbose"):
                raise
            if isinstance(err, ConfigError):
                message = f"--{err.field.replace('_', '-')} {err.problem}"
                hint = f"see `{ctx.meta.get('saealign.command', ctx.command_path)} --help`"
            else:
                message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
                hint = "rerun with `saealign -v ...` for the full traceback"
            click.echo(f"error: {message}\nhint: {hint}", err=True)
            ctx.exit(2)


HELP_AS_PLAIN_TEXT = None  # typer's rich markup would swallow `[one of: ...]` notes and `[[rating]]` in help texts


def _typer(help: str) -> typer.Typer:
    return typer.Typer(cls=_Group, help=help, no_args_is_help=True, rich_markup_mode=HELP_AS_PLAIN_TEXT)


app = typer.Typer(cls=_Group, help="Preference alignment through sparse-autoencoder features (DSPA, FPO, baselines, evaluation).",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=HELP_AS_PLAIN_TEXT)
sae_app = _typer("Train, evaluate and inspect sparse autoencoders.")
data_app = _typer("Load and inspect preference data.")
dspa_app = _typer("DSPA: fit, merge and inspect prompt-conditional steering maps.")
eval_app = _typer("Evaluate base, steered and trained models.")
fpo_app = _typer("FPO / DPO / SimPO / TDPO preference training.")
rahf_app = _typer("RAHF-SCIT baseline: self-contrastive instruction tuning, then representation alignment.")
app.add_typer(sae_app, name="sae")
app.add_typer(data_app, name="data")
app.add_typer(dspa_app, name="dspa")
app.add_typer(eval_app, name="eval")
app.add_typer(fpo_app, name="fpo")
app.add_typer(rahf_app, name="rahf")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Log at INFO level and show the full traceback of an error.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Imported for their side effect of adding commands to the apps above.
    from saealign.cli import (attributes_cmd, data_cmd, dspa_cmd, eval_gen_cmd, eval_mc_cmd,  # noqa: F401
                              eval_pref_cmd, fpo_cmd, models_cmd, rahf_cmd, sae_cmd, serve_cmd)
    from saealign.cli import audit_cmd  # noqa: F401


def main() -> None:
    _register()
    app()
