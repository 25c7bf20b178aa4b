"""Two processes on the CPU (gloo), launched the way users launch several GPUs."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, script_env, train_args
from safetensors.torch import load_file

from wuerstchen_lora.models import LORA_WEIGHTS_NAME, lora_digest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, processes=2, launcher="accelerate"):
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"] + (["--multi_gpu"] if processes > 1 else []) + ["--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_two_processes_train_resume_and_agree(tiny, tmp_path):
    extra = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-3", "--random_flip",
             "--lr_scheduler", "linear"]
    full = tmp_path / "full"
    proc = launch(train_args(tiny, full, extra=extra))
    out = proc.stdout
    assert "effective batch 4 (2 x 2 processes x 1 accumulation)" in out
    assert re.findall(r"process \d+ wrote", out) == ["process 0 wrote"]  # written once, by the main process
    digest = re.search(r"LoRA weights identical on all 2 processes \(sha256 ([0-9a-f]+)\)", out).group(1)
    assert lora_digest(load_file(full / LORA_WEIGHTS_NAME)).startswith(digest)  # the file is what every rank holds
    # both ranks ran: each encoded its share of the cache and saved its RNG state
    cache = next((full / "embeddings_cache").iterdir())
    assert {p.name for p in cache.glob("images-*")} == {"images-000.safetensors", "images-001.safetensors"}
    assert (full / "checkpoint-3" / "random_states_1.pkl").is_file()
    info = json.loads((full / "training_info.json").read_text())
    assert info["num_processes"] == 2 and info["global_step"] == 6
    # the LR schedule counts optimiser steps: linear decay is half-way after 3 of 6 steps
    scheduler = torch.load(full / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert scheduler["_last_lr"][0] == pytest.approx(0.5e-3)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    launch(train_args(tiny, resumed, extra=extra + ["--resume_from_checkpoint", "latest"]))
    a, b = load_file(full / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def prior_without_dropout(tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("nodropout") / "prior_repo"
    shutil.copytree(tiny["prior"], repo)
    config = repo / "prior" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dropout": 0.0}))
    return {**tiny, "prior": str(repo)}


def test_gradients_are_averaged_across_processes(prior_without_dropout, tmp_path):
    """Steps on 2 processes x batch 2 == steps on 1 process x batch 4: same samples, same
    per-sample noise and timesteps, no dropout. A large Adam epsilon makes the first update
    proportional to the gradient (lr * g / eps) instead of its sign, so a sum instead of a mean shows."""
    # 3 steps of 4 samples out of 8: the third step is in the second epoch, whose noise must be drawn anew
    extra = ["--max_train_steps", "3", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0",
             "--max_grad_norm", "0", "--center_crop"]
    two = tmp_path / "two"
    launch(train_args(prior_without_dropout, two, extra=extra + ["--train_batch_size", "2"]), launcher="torchrun")
    one = tmp_path / "one"
    launch(train_args(prior_without_dropout, one, extra=extra + ["--train_batch_size", "4"]), processes=1)
    a, b = load_file(two / LORA_WEIGHTS_NAME), load_file(one / LORA_WEIGHTS_NAME)
    moved = [k for k in a if "lora_B" in k]
    assert all(a[k].abs().max() > 0 for k in moved), "the step did not move lora_B"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.mixed_precision == "bf16" and loaded.num_processes >= 1
