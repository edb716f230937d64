"""Two CPU processes (gloo) under `accelerate launch` follow the 1-process loss trajectory with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saealign.fpo import trainer as T

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import build_tiny
    from saealign.fpo import trainer as T
    from test_fpo_support import random_pairs, tiny_sae, tiny_tokenizer

    torch.set_num_threads(1)  # two processes share the machine
    cfg = T.TrainConfig(**{cfg!r})
    T.train(cfg, model=build_tiny("llama"), tokenizer=tiny_tokenizer(), pairs=random_pairs(16, seed=4), sae=tiny_sae())
""")


def _read(out_dir):
    rows = [json.loads(line) for line in (out_dir / T.METRICS_FILE).read_text().splitlines()]
    return {"rows": rows, "summary": json.loads((out_dir / "train_summary.json").read_text())}


def _config(out_dir, per_device):
    return dict(output=str(out_dir), loss="fpo", device="cpu", progress=False, learning_rate=1e-3,
                warmup_ratio=0.0, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                num_train_epochs=1)


@pytest.mark.multiprocess
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "train_mp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), cfg=_config(tmp_path / "mp", per_device=1)))
    env = {**os.environ, "SAEALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # `--cpu` alone would need mpirun for several processes; the torchrun launcher (`--multi_gpu`) plus the
    # trainer's CPU accelerator gives 2 processes joined with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single_script = tmp_path / "train_sp.py"
    single_script.write_text(SCRIPT.format(tests=str(TESTS), cfg=_config(tmp_path / "sp", per_device=2)))
    env["SAEALIGN_CACHE"] = str(tmp_path / "cache1")
    proc = subprocess.run([sys.executable, str(single_script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    multi, single = (_read(tmp_path / name) for name in ("mp", "sp"))
    assert multi["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
    assert multi["summary"]["global_batch"] == single["summary"]["global_batch"] == 4
    assert [r["step"] for r in multi["rows"]] == [r["step"] for r in single["rows"]] == [1, 2, 3, 4]
    for a, b in zip(single["rows"], multi["rows"]):
        for key in ("loss", "rewards/margins", "fpo/mse_rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    from transformers import AutoModelForCausalLM

    p1 = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "sp").named_parameters())
    for name, p2 in AutoModelForCausalLM.from_pretrained(tmp_path / "mp").named_parameters():
        torch.testing.assert_close(p1[name], p2, rtol=1e-4, atol=1e-5, msg=name)
