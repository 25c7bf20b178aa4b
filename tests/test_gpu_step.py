"""The GPU step's CPU proxies: no host wait inside a step, compiled blocks that match eager and
fall back to it, partial gradient checkpointing, norms in bf16, and every mode's LoRA file loading
in plain diffusers."""

import json

import pytest
import torch
from conftest import prior_output, run_script, train_args
from safetensors.torch import load_file

from wuerstchen_lora import flags
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, load_prior_components

# Random crops and flips, the prior's dropout on: the comparisons below hold with randomness on.
RANDOM = ["--random_flip", "--caption_dropout", "0.2", "--learning_rate", "1e-3"]


def losses_of(out):
    return [loss for _, loss in json.loads((out / "training_info.json").read_text())["loss_history"]]


def lora_of(out):
    return load_file(out / LORA_WEIGHTS_NAME)


def assert_same_lora(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def diffusers_output(tiny, out):
    """The prior's output after plain diffusers' load_lora_weights of the run's file."""
    from diffusers import WuerstchenPriorPipeline

    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    base = prior_output(prior)
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHTS_NAME)
    loaded = prior_output(prior)
    assert not torch.allclose(base, loaded, atol=1e-6), "the LoRA file changed nothing"
    return loaded


@pytest.fixture(scope="module")
def eager_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "out"
    run_script(train_args(tiny, out, steps=6, extra=RANDOM + ["--logging_steps", "1"]), launcher="inprocess")
    return out


class SyncCounter:
    """Counts the calls that make the host wait for the device (item, tolist, bool, float, int,
    numpy) while `active` is set."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return counted


def test_no_host_wait_inside_a_step_only_at_logging_steps(tiny, tmp_path, monkeypatch):
    """The step never reads a tensor back; the bookkeeping after it does so only every
    --logging_steps. On a GPU each such read is a wait for the device."""
    counter = SyncCounter(monkeypatch)
    per_step, per_update = [], {}
    step_fn, update_fn = trainer.training_step, trainer.after_update

    def counted_step(*args):
        counter.active, counter.calls = True, []
        try:
            return step_fn(*args)
        finally:
            counter.active = False
            per_step.append(list(counter.calls))

    def counted_update(run, loss, finite, global_step):
        counter.active, counter.calls = True, []
        try:
            return update_fn(run, loss, finite, global_step)
        finally:
            counter.active = False
            per_update[global_step] = list(counter.calls)

    monkeypatch.setattr(trainer, "training_step", counted_step)
    monkeypatch.setattr(trainer, "after_update", counted_update)
    out = tmp_path / "out"
    # accumulation 2: the window's end (gather, finite check, update, EMA) is inside the step too
    run_script(train_args(tiny, out, steps=8, extra=RANDOM + ["--logging_steps", "4", "--gradient_accumulation_steps", "2", "--use_ema",
                                                              "--checkpointing_steps", "0", "--validation_steps", "1000"]), launcher="inprocess")
    assert len(per_step) == 16 and all(calls == [] for calls in per_step), per_step
    assert sorted(per_update) == list(range(1, 9))
    for step, calls in per_update.items():
        if step % 4:
            assert calls == [], (step, calls)
        else:
            assert calls == ["tolist"], (step, calls)  # one read for the four steps' losses and flags
    assert len(losses_of(out)) == 8


def test_logging_interval_changes_nothing_but_when_losses_are_read(tiny, tmp_path, eager_run):
    out = tmp_path / "out"
    run_script(train_args(tiny, out, steps=6, extra=RANDOM + ["--logging_steps", "5"]), launcher="inprocess")
    assert losses_of(out) == losses_of(eager_run)
    assert_same_lora(lora_of(out), lora_of(eager_run))


def test_a_nonfinite_window_is_skipped_on_the_device(tiny):
    """Fused AdamW with found_inf = 1 leaves weights and state as they were; with 0 it steps."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.full((3,), float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    del optimizer.found_inf
    assert torch.equal(param.detach(), torch.ones(3))
    assert float(optimizer.state[param]["step"]) == 0
    param.grad = torch.ones(3)
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert (param.detach() < 1).all() and float(optimizer.state[param]["step"]) == 1


def test_compiled_blocks_match_eager_and_load_in_diffusers(tiny, tmp_path):
    """Inductor, block by block, the prior's dropout off: the same losses and LoRA as eager, to
    float tolerance, and a file plain diffusers loads (keys without `_orig_mod`)."""
    extra = ["--prior_dropout", "0", "--random_flip", "--learning_rate", "1e-3", "--logging_steps", "1"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_script(train_args(tiny, eager, steps=5, extra=extra), launcher="inprocess")
    proc = run_script(train_args(tiny, compiled, steps=5, extra=extra + ["--torch_compile"]), launcher="inprocess")
    assert "warning" not in proc.stderr, proc.stderr[-2000:]
    for a, b in zip(losses_of(compiled), losses_of(eager), strict=True):
        assert abs(a - b) < 1e-3, (losses_of(compiled), losses_of(eager))
    assert_same_lora(lora_of(compiled), lora_of(eager), atol=1e-4)
    assert all(key.startswith("prior.blocks.") for key in lora_of(compiled))
    torch.testing.assert_close(diffusers_output(tiny, compiled), diffusers_output(tiny, eager), rtol=1e-3, atol=1e-4)


def test_a_failing_compiler_warns_once_and_trains_eagerly(tiny, tmp_path, eager_run):
    import torch._dynamo

    @torch._dynamo.register_backend(name="fails_for_the_test")
    def fails(graph, example_inputs):
        raise RuntimeError("this backend always fails")

    out = tmp_path / "out"
    proc = run_script(train_args(tiny, out, steps=6, extra=RANDOM + ["--logging_steps", "1", "--torch_compile", "--torch_compile_backend", "fails_for_the_test"]),
                      launcher="inprocess")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: --torch_compile failed")]
    assert len(warnings) == 1 and "this backend always fails" in warnings[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # the failed first step was redone eagerly from the same state: exactly the eager run
    assert losses_of(out) == losses_of(eager_run)
    assert_same_lora(lora_of(out), lora_of(eager_run))


def test_unknown_compile_backend_is_a_clear_error(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert trainer.main([str(a) for a in train_args(tiny, out, extra=["--torch_compile", "--torch_compile_backend", "nope"])[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --torch_compile_backend nope: unknown") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_partial_checkpointing_same_run_and_loads(tiny, tmp_path, eager_run):
    """Half of the blocks recomputed: the same weights as without checkpointing (the recomputation
    replays the dropout masks), and the file loads in plain diffusers."""
    out = tmp_path / "out"
    run_script(train_args(tiny, out, steps=6, extra=RANDOM + ["--logging_steps", "1", "--gradient_checkpointing", "0.5"]), launcher="inprocess")
    for a, b in zip(losses_of(out), losses_of(eager_run), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert_same_lora(lora_of(out), lora_of(eager_run), atol=1e-6)
    diffusers_output(tiny, out)


def test_checkpoint_fraction_picks_blocks_evenly(tiny):
    prior, *_ = load_prior_components(tiny["prior"])
    n = len(prior.blocks)
    trainer.checkpoint_blocks(prior, 0.5)
    wrapped = [i for i, block in enumerate(prior.blocks) if "forward" in vars(block)]
    assert len(wrapped) == (n + 1) // 2 and wrapped[0] == 0 and wrapped[-1] >= n - 2
    assert not prior.gradient_checkpointing  # diffusers' all-block switch stays off


def test_norms_in_bf16_agree_with_fp32_norms(tiny):
    """bf16 norms give the prior's bf16 output to bf16 precision. The reference runs the norms in
    fp32, as CUDA autocast does (CPU autocast leaves them in bf16, so it is emulated here)."""
    prior, *_ = load_prior_components(tiny["prior"])
    prior = prior.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.norms_in_activation_dtype(prior, torch.float32)  # the CUDA-autocast reference
        reference = prior_output(prior).float()
        trainer.norms_in_activation_dtype(prior, torch.bfloat16)  # what training runs
        patched = prior_output(prior).float()
    assert not torch.equal(reference, patched)
    torch.testing.assert_close(patched, reference, rtol=3e-2, atol=3e-2)


def test_bf16_norms_remove_dtype_copies_under_cuda_autocast(tiny):
    """Under CUDA's autocast policy (fake CUDA tensors: no GPU needed), one forward and backward of
    the prior with LoRA dispatches fewer dtype copies with the bf16 norms and peft's input casting off."""
    from tools.op_count import lora_step_ops

    config = json.loads((__import__("pathlib").Path(tiny["prior"]) / "prior" / "config.json").read_text())
    before = lora_step_ops(config, optimized=False)
    after = lora_step_ops(config, optimized=True)
    assert after["aten._to_copy.default"] < before["aten._to_copy.default"], (before, after)
    assert sum(after.values()) < sum(before.values())


def test_gradient_checkpointing_flag_values():
    assert flags.parse_args(["--dataset", "d", "--gradient_checkpointing"]).optim.gradient_checkpointing == 1.0
    assert flags.parse_args(["--dataset", "d", "--gradient_checkpointing", "0.25"]).optim.gradient_checkpointing == 0.25
    assert flags.parse_args(["--dataset", "d"]).optim.gradient_checkpointing == 0.0
    with pytest.raises(trainer.UserError, match=r"--gradient_checkpointing must be in \(0, 1\] \(got 1.5\)"):
        flags.parse_args(["--dataset", "d", "--gradient_checkpointing", "1.5"])


def test_benchmark_device_path_runs_on_the_cpu(tmp_path):
    """`bench/benchmark.py --device cuda`'s code path, tiny and on the CPU: the bare floor per
    precision (the shared step, timed by torch.utils.benchmark), one trainer run per kind of mode
    (timed by the trainer itself), the op counts, and both result files. Run as a file from another
    folder, without the project on PYTHONPATH, as a user types it (`-m bench.benchmark` works too)."""
    import subprocess
    import sys

    from conftest import ROOT, script_env

    env = script_env()
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--smoke_device_path", "--out", str(tmp_path / "out"),
                           "--modes", "eager bf16,compile default,checkpointing 0.5"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["floors"]) == {"bf16", "fp16"} and all(r["s_per_step"] > 0 and r["runs"] >= 1 and r["step_flops"] > 0 for r in results["floors"].values())
    assert list(results["runs"]) == ["eager bf16", "compile default", "checkpointing 0.5"]
    for name, row in results["runs"].items():
        assert "error" not in row and row["s_per_step"] > 0 and row["windows"] >= 1 and row["floor"] == "bf16", (name, row)
    ops = results["ops"]
    assert ops["trainer"]["dtype_copies"] < ops["before"]["dtype_copies"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| eager bf16 |" in table and "| bare floor fp16 |" in table and table in proc.stdout
