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


def _cli_configs() -> list[type]:
    """Every config dataclass a command is built from, its bases and the dataclasses its fields hold, plus the
    library configs that are saved with artifacts."""
    import dataclasses
    import typing

    from saealign.cli import _register
    from saealign.cli._config import CONFIG_CLASSES
    from saealign.dspa.map import FitOptions
    from saealign.dspa.steer import SteerConfig
    from saealign.sae.core import SAEConfig

    _register()
    found: list[type] = []

    def visit(cls: type) -> None:
        if cls in found:
            return
        found.append(cls)
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                visit(base)
        for tp in typing.get_type_hints(cls).values():
            for inner in (tp, *typing.get_args(tp)):
                if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                    visit(inner)

    for cls in [*CONFIG_CLASSES, SAEConfig, FitOptions, SteerConfig]:
        if cls.__module__.startswith("saealign."):  # not the configs of the test apps in this suite
            visit(cls)
    return found


def test_every_config_field_is_documented():
    import dataclasses

    configs = _cli_configs()
    undocumented = [f"{cls.__module__}.{cls.__qualname__}.{f.name}" for cls in configs
                    for f in dataclasses.fields(cls) if f.name in vars(cls).get("__annotations__", {})
                    and not f.metadata.get("help")]
    assert len(configs) > 15 and not undocumented, "fields without help:\n" + "\n".join(undocumented)


def test_config_fields_follow_the_glossary():
    """One name per meaning (saealign.config.GLOSSARY): none of the synonyms it replaced comes back."""
    import dataclasses

    from saealign.config import GLOSSARY

    replaced = {"out_dir": "output", "output_dir": "output", "out": "output", "limit": "n", "max_pairs": "n",
                "max_texts": "n", "show_progress": "progress", "data_split_seed": "split_seed", "data_dir": "data",
                "extract_dtype": "dtype", "method": "methods"}
    assert set(replaced.values()) <= set(GLOSSARY)
    drifted = [f"{cls.__qualname__}.{f.name} (say {replaced[f.name]})" for cls in _cli_configs()
               for f in dataclasses.fields(cls) if f.name in replaced]
    assert not drifted, drifted
