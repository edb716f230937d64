"""Config dataclasses drive the CLI: flags, --config files, required fields, type errors."""

import json
from dataclasses import dataclass, field

import typer
from typer.testing import CliRunner

from saealign.cli._config import config_command


@dataclass
class Cfg:
    name: str = ""
    layers: list[int] = field(default_factory=list)
    rate: float = 0.5
    flag: bool = False
    extra: dict = field(default_factory=dict)
    maybe: int | None = None


def _app(store):
    app = typer.Typer()

    @config_command(app, "run", Cfg, required=("name",))
    def run(cfg: Cfg) -> None:
        store.append(cfg)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in sub-command mode
        pass

    return app


def test_flags_and_file(tmp_path):
    got = []
    app = _app(got)
    runner = CliRunner()
    (tmp_path / "c.json").write_text(json.dumps({"name": "from-file", "rate": 0.1, "layers": [1, 2]}))
    res = runner.invoke(app, ["run", "--config", str(tmp_path / "c.json"), "--rate", "0.9", "--flag", "--extra", '{"a": 1}'])
    assert res.exit_code == 0, res.output
    assert got[-1] == Cfg(name="from-file", layers=[1, 2], rate=0.9, flag=True, extra={"a": 1})
    res = runner.invoke(app, ["run", "--name", "x", "--layers", "3", "--layers", "4", "--maybe", "7"])
    assert res.exit_code == 0 and got[-1].layers == [3, 4] and got[-1].maybe == 7


def test_errors_are_named(tmp_path):
    app = _app([])
    runner = CliRunner()
    res = runner.invoke(app, ["run"])
    assert res.exit_code != 0 and "--name" in res.output
    (tmp_path / "bad.json").write_text(json.dumps({"name": "a", "nope": 1}))
    res = runner.invoke(app, ["run", "--config", str(tmp_path / "bad.json")])
    assert res.exit_code != 0 and "nope" in res.output
    res = runner.invoke(app, ["run", "--name", "a", "--rate", "fast"])
    assert res.exit_code != 0


def test_method_entries_name_columns_and_keep_paths_whole():
    from saealign.steering import split_method_entry

    assert split_method_entry("DSPA=dspa:runs/map") == ("DSPA", "dspa:runs/map")
    assert split_method_entry("dspa:runs/a=b") == ("", "dspa:runs/a=b")
    assert split_method_entry("best=dspa:runs/a=b") == ("best", "dspa:runs/a=b")
    assert split_method_entry("base") == ("", "base")
