"""Bad options are refused when the config is built — before a model loads or anything is generated —
and the CLI reports them as one `error:` line (issue #13). Every command here names a model that does
not exist, so a refusal that came after loading would show up as a different error."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from saealign.cli import _register, app
from saealign.config import ConfigError, check_config

_register()
NO_MODEL = "/nonexistent/model"


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                            for i in range(8)))
    return path


def refused(*args: str) -> str:
    """Run the CLI; it must exit with code 2 and one `error:` line (and a hint), no traceback."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@dataclass
class _Cfg:
    mode: Literal["a", "b"] = "a"
    modes: list[Literal["x", "y"]] = field(default_factory=list)
    maybe: Literal["p"] | None = None
    k: int = field(default=1, metadata={"ge": 1})
    frac: float = field(default=0.5, metadata={"gt": 0, "lt": 1})

    def __post_init__(self):
        check_config(self)


def test_the_generic_check_covers_literals_and_bounds():
    _Cfg(modes=["x", "y"], maybe="p", k=3)
    for kwargs, message in [({"mode": "c"}, "mode must be one of a, b; 'c' is not a known mode"),
                            ({"modes": ["x", "z"]}, "modes must be one of x, y"), ({"maybe": "q"}, "maybe must be one of p"),
                            ({"k": 0}, "k must be >= 1, got 0"), ({"frac": 1.0}, "frac must be < 1, got 1.0")]:
        with pytest.raises(ConfigError, match=message) as err:
            _Cfg(**kwargs)
        assert err.value.field == next(iter(kwargs))


def test_fpo_train_refuses_a_negative_beta_before_loading(pairs):
    from saealign.fpo.trainer import TrainConfig

    with pytest.raises(ConfigError, match="beta must be > 0"):
        TrainConfig(beta=-1)
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        TrainConfig(learning_rate=0)
    assert refused("fpo", "train", "--data", str(pairs), "--model", NO_MODEL, "--beta", "-1") == \
        "error: --beta must be > 0, got -1.0"
    assert refused("fpo", "train", "--data", str(pairs), "--model", NO_MODEL, "--loss", "ipo").startswith(
        "error: --loss must be one of fpo, dpo, simpo, tdpo1, tdpo2; 'ipo' is not a known loss")


def test_config_files_are_refused_the_same_way(pairs, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": str(pairs), "model": NO_MODEL, "beta": -1}))
    assert refused("fpo", "train", "--config", str(tmp_path / "c.json")) == "error: --beta must be > 0, got -1"


def test_a_negative_steering_threshold_is_refused(pairs, tmp_path):
    from saealign.dspa.steer import SteerConfig

    with pytest.raises(ConfigError, match="threshold must be >= 0"):
        SteerConfig(threshold=-5)
    assert refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--methods", f"dspa:{tmp_path}",
                   "--threshold", "-5") == "error: --threshold must be >= 0, got -5.0"


def test_eval_pref_refuses_more_triples_than_the_data_has_and_n_zero(pairs):
    line = refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--n", "400")
    assert line == f"error: --n asks for 400 triples, but {pairs} has only 8"
    assert refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--n", "0") == \
        "error: --n must be >= 1, got 0"


def test_steering_options_for_a_method_that_takes_none_are_refused(pairs):
    from saealign.steering import load_method

    line = refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--methods", "base", "--alpha", "0.5")
    assert line == "error: --alpha is given, but none of the methods takes it (base)"
    line = refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--methods", "base",
                   "--methods", "prompt-prefix", "--coef", "2")
    assert line == "error: --coef is given, but none of the methods takes it (base, prompt-prefix)"
    with pytest.raises(ConfigError, match="alpha is not an option of method 'base' \\(it takes no options\\)"):
        load_method("base", alpha=0.5)
    with pytest.raises(ConfigError, match="alpha is not an option of method 'prompt-prefix'"):
        load_method("prompt-prefix", alpha=0.5)


def test_missing_or_unknown_methods_are_refused_before_loading(pairs, tmp_path):
    assert refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--methods", "magic").startswith(
        "error: unknown method 'magic'")
    assert refused("eval", "pref", "--data", str(pairs), "--model", NO_MODEL, "--methods",
                   f"dspa:{tmp_path / 'nope'}") == f"error: method 'dspa:{tmp_path / 'nope'}': no artifact directory " \
                                                   f"'{tmp_path / 'nope'}'"


def test_zero_counts_are_refused_everywhere():
    from saealign.eval.pref import PrefEvalConfig
    from saealign.sae.evaluate import SAEEvalConfig
    from saealign.eval.alpaca_eval import AlpacaEvalConfig
    from saealign.eval.mt_bench import MTBenchConfig
    from saealign.fpo.trainer import TrainConfig
    from saealign.sae.train import SAETrainConfig

    for cls, name in [(PrefEvalConfig, "n"), (SAEEvalConfig, "n"), (MTBenchConfig, "n"),
                      (AlpacaEvalConfig, "n"), (TrainConfig, "n"), (SAETrainConfig, "n"),
                      (SAETrainConfig, "k"), (MTBenchConfig, "batch_size"), (TrainConfig, "num_train_epochs")]:
        with pytest.raises(ConfigError, match=f"{name} must be >= 1, got 0"):
            cls(**{name: 0})


@pytest.mark.parametrize("command, required", [
    ("mt-bench", ["--data", "DIR"]),
    ("alpaca-eval", ["--reference-outputs", "DIR/ref.json", "--judge-template", "DIR/t.txt"]),
])
def test_judge_mode_is_refused_before_anything_is_generated(tmp_path, command, required):
    out = tmp_path / "out"
    args = [a.replace("DIR", str(tmp_path)) for a in required]
    line = refused("eval", command, *args, "--output", str(out), "--model", NO_MODEL, "--judge-mode", "vote")
    assert line.startswith("error: --judge-mode must be one of ") and "'vote' is not a known judge mode" in line
    assert refused("eval", command, *args, "--output", str(out), "--model", NO_MODEL, "--judge", "gpt4") == \
        "error: unknown judge 'gpt4': expected openai:MODEL, hf:NAME_OR_PATH, rm:PATH or self"
    assert not out.exists()


def test_a_judge_that_cannot_serve_the_mode_is_refused():
    from saealign.eval.mt_bench import MTBenchConfig

    with pytest.raises(ConfigError, match="'likelihood' needs a judge that can do 'continuations'"):
        MTBenchConfig(judge="openai:gpt-4o", judge_base_url="http://127.0.0.1:9/v1", judge_mode="likelihood")
    MTBenchConfig(judge="nonsense", skip_judge=True)  # no judge is built


def test_sae_train_k0_is_refused_before_extraction_and_leaves_nothing(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text\n")
    out = tmp_path / "sae"
    line = refused("sae", "train", "--layers", "1", "--corpus", str(tmp_path / "corpus.txt"), "--output", str(out),
                   "--model", NO_MODEL, "--k", "0")
    assert line == "error: --k must be >= 1, got 0"
    assert refused("sae", "train", "--layers", "1", "--corpus", "c", "--output", str(out), "--model", NO_MODEL,
                   "--d-sae", "16", "--k", "32") == "error: --k must be <= --d-sae (16), got 32"
    assert not out.exists()


def test_user_errors_are_one_line_with_a_hint_and_verbose_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(app, ["fpo", "train", "--data", "x", "--beta", "-1"])
    assert result.output.splitlines() == ["error: --beta must be > 0, got -1.0", "hint: see `root fpo train --help`"]
    missing = str(tmp_path / "missing.jsonl")
    line = refused("eval", "pref", "--data", missing, "--model", NO_MODEL)
    assert line.startswith("error: ") and "missing.jsonl" in line
    verbose = CliRunner().invoke(app, ["-v", "eval", "pref", "--data", missing, "--model", NO_MODEL])
    assert isinstance(verbose.exception, FileNotFoundError)


def test_the_installed_command_prints_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "saealign", "fpo", "train", "--data", "x", "--beta", "-1"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert quiet.returncode == 2 and quiet.stderr.splitlines() == [
        "error: --beta must be > 0, got -1.0", "hint: see `python -m saealign fpo train --help`"]
    loud = subprocess.run(argv[:3] + ["-v"] + argv[3:], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and loud.stderr.rstrip().endswith(
        "ConfigError: beta must be > 0, got -1.0")


def test_usage_errors_stay_typers_and_help_shows_choices_bounds_and_defaults():
    @dataclass
    class Cfg:
        mode: Literal["a", "b"] = "a"
        k: int = field(default=1, metadata={"help": "Count.", "ge": 1})

    from saealign.cli._config import config_command

    demo = typer.Typer()
    config_command(demo, "run", Cfg)(lambda cfg: None)
    demo.command("noop")(lambda: None)
    params = {p.name: p.help for p in typer.main.get_command(demo).commands["run"].params}
    assert params["mode"] == "[one of: a, b] [default: a]" and params["k"] == "Count. [>= 1] [default: 1]"
    usage = CliRunner().invoke(app, ["fpo", "train", "--model", NO_MODEL])
    assert usage.exit_code == 2 and "--data" in usage.output and "error: " not in usage.output


def test_data_inspect_refuses_a_zero_n(pairs):
    result = CliRunner().invoke(app, ["data", "inspect", str(pairs), "--n", "0"])
    assert result.exit_code == 2 and "--n" in result.output and "error: " not in result.output


def test_demo_mc_and_fpo_eval_configs_check_themselves():
    from saealign.demo import DemoConfig
    from saealign.eval.mc import MCConfig
    from saealign.fpo.evaluate import CompareConfig

    for make, kwargs in ((DemoConfig, {"alpha": -1}), (DemoConfig, {"heldout": 1.0}), (MCConfig, {"n": 0}),
                         (CompareConfig, {"batch_size": 0})):
        with pytest.raises(ConfigError, match="must be"):
            make(**kwargs)
