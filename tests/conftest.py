"""Shared fixtures: tiny random models with the real classes, built once per session, and helpers
that run the real scripts in a subprocess. Nothing here touches the network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

from tools.make_tiny_models import make_all, make_image_dataset  # noqa: E402

TRAIN = str(ROOT / "train_wuerstchen_prior_lora.py")
INFER = str(ROOT / "infer.py")


def script_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tests pin the CPU path, also on a machine with a GPU
    return env


def run_in_process(args):
    """The script's main() in this process, output captured: the same code path as the command
    line minus the interpreter start-up (about 7 s a run on 2 cores), for tests about results
    rather than about the command line itself."""
    import contextlib
    import io
    import types

    from wuerstchen_lora import inference as infer
    from wuerstchen_lora import recipe as train_wuerstchen_prior_lora
    main = {TRAIN: train_wuerstchen_prior_lora.main, INFER: infer.main}[str(args[0])]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args[1:]])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_script(args, launcher="python", check=True, timeout=600):
    """Run a script as a user would: `python X.py ...` or `accelerate launch X.py ...`; or its main()
    in this process (launcher="inprocess")."""
    if launcher == "inprocess":
        proc = run_in_process(args)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"] + [str(a) for a in args]
    else:
        cmd = [sys.executable] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=str(ROOT), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


class OneProcess:
    """Stands in for accelerate's Accelerator in single-process tests of the cache code."""

    process_index, num_processes, is_main_process, is_local_main_process = 0, 1, True, True

    def print(self, *a):
        pass

    def wait_for_everyone(self):
        pass


def assert_clean_error(proc, *needles, status=2):
    """A refused run: the exit status, no traceback, one `error:` line holding each needle; returns
    that line."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_models(monkeypatch):
    """Refusals must come before any model loads: loading one fails the test."""
    from wuerstchen_lora import recipe

    def boom(*a, **k):
        raise AssertionError("models were loaded before the refusal")

    monkeypatch.setattr(recipe, "load_frozen_models", boom)


def prior_output(prior, seed=0):
    """The prior's output (eval mode, no grad) on a fixed random input: compares two priors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, prior.config.c_in, 4, 4, generator=g)
    r = torch.rand(2, generator=g)
    cond = torch.randn(2, 77, prior.config.c_cond, generator=g)
    with torch.no_grad():
        return prior.eval()(x, r, cond)


def train_args(tiny, output_dir, dataset=None, steps=2, extra=()):
    return [TRAIN,
            "--pretrained_prior_model_name_or_path", tiny["prior"],
            "--pretrained_decoder_model_name_or_path", tiny["decoder"],
            "--image_encoder", tiny["image_encoder"],
            "--dataset", dataset or tiny["dataset"],
            "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--report_to", "none", *extra]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """One real training run shared by the tests that look at its output: rank 4, alpha 8 (alpha != rank
    so that the metadata round-trip matters), enough steps at a high LR for a visible effect."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run_script(train_args(tiny, out, steps=30, extra=[
        "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--checkpointing_steps", "15",
        "--validation_prompts", "a red circle", "a blue square", "--validation_steps", "15",
        "--resolution", "128", "--report_to", "tensorboard"]), launcher="accelerate")
    return out


@pytest.fixture
def dataset_factory(tmp_path):
    def make(kind, **kwargs):
        return make_image_dataset(tmp_path / kind, kind, **kwargs)
    return make


def pytest_addoption(parser):
    parser.addoption("--golden-print", action="store_true", help="print the golden loss curve instead of checking it (tests/test_golden_losses.py)")
