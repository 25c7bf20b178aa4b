#!/usr/bin/env python
"""Speed and memory figures for LoRA training of the Wuerstchen v2 prior (Stage C).

Run by hand (never by the tests); everything is offline and built from random weights.

CPU (default): a scaled prior (c 384, c_cond 64, c_r 64, depth 4, nhead 6), 256 px, batch 4, rank 4:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/benchmark.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/benchmark.py --threads 2 --loop_repeats 2   # an idle machine
    HF_HUB_OFFLINE=1 .venv/bin/python bench/benchmark.py --only loop,floor      # a subset of the sections
    HF_HUB_OFFLINE=1 .venv/bin/python bench/benchmark.py --workdir /tmp/wbench  # keep and reuse the built models

It prints
  * the training loop's steady-state seconds per step, cached and uncached, measured on the REAL
    script (train_wuerstchen_prior_lora.py in a subprocess): (wall(N2 steps) - wall(N1 steps)) / (N2 - N1),
    so start-up, model loading and cache building cancel out;
    plus an in-run figure read from the progress bar's per-step timestamps;
  * the bare floor: prior forward + backward + AdamW on one fixed batch, in-process, nothing else,
    timed in blocks between the trainer runs;
  * loop / floor (judged on median one-epoch windows of both, which start-up noise cannot reach)
    and uncached / cached;
  * where a cached step of the real trainer goes (its main() run with timers): forward, backward,
    optimiser, and the loop's own overhead;
  * peak memory of LoRA training versus full fine-tuning (each in a fresh subprocess): peak live tensor
    bytes (from the allocator events) and peak RSS, in fp32 and in bf16 mixed precision;
  * trainable-parameter counts for the scaled and the real prior (real one built on the meta device);
  * prior forward latency: base, unmerged LoRA, fused LoRA.

GPU (bench/device_bench.py): builds a real-size random prior repo and text encoder, times the bare
floor and runs train_wuerstchen_prior_lora.py itself per mode (eager bf16/fp16, compile modes,
gradient checkpointing fractions): s/step, images/s, peak memory, trainer/floor, MFU; writes
results.json and results.md (sized to fit in 8 minutes on an H200; not yet run on one):

    .venv/bin/python bench/benchmark.py --device cuda --out /tmp/gpu
    .venv/bin/python bench/benchmark.py --device cuda --modes "eager bf16,compile reduce-overhead"

Check the GPU code path on the CPU (tiny sizes, a test runs it) before renting a GPU:

    .venv/bin/python bench/benchmark.py --smoke_device_path --out /tmp/smoke
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

TRAIN = ROOT / "train_wuerstchen_prior_lora.py"
PROGRESS_RE = re.compile(rb"steps:\s*\d+%.*?\|\s*(\d+)/(\d+)\s*\[")

# Real prior (warp-ai/wuerstchen-prior, subfolder prior).
REAL_PRIOR = {"c_in": 16, "c": 1536, "c_cond": 1280, "c_r": 64, "depth": 32, "nhead": 24, "dropout": 0.1}
# The scaled prior of the CPU figures (the configuration).
SCALED_PRIOR = {"c_in": 16, "c": 384, "c_cond": 64, "c_r": 64, "depth": 4, "nhead": 6, "dropout": 0.1}
# Real text encoder: CLIP ViT-bigG text tower, hidden 1280, 32 layers, 20 heads, MLP 5120, 77 tokens.
# Scaled: hidden must equal the prior's c_cond (64); depth / 8 like the prior (32 -> 4), head width 16,
# MLP 4 x hidden as in CLIP. About 0.26 M parameters in the layers against 695 M.
SCALED_TEXT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}
REAL_TEXT = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOKENS = 77

CPU_RES, CPU_BATCH, CPU_RANK = 256, 4, 4
GPU_GRID, GPU_BATCH = 24, 8

TARGETS = {"loop_over_floor": 1.10, "cached_speedup": 3.0, "memory_fraction": 1 / 3, "fused_latency": 1.02}


# ----------------------------------------------------------------------------------------------
# Small utilities


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ForeignLoad:
    """CPU time other processes used while a block ran, in cores (from /proc/stat minus our own usage).

    A timing with foreign load near a core on a 2-core machine is not trustworthy: the figures say so.
    """

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy = self._busy() - self.busy0
        own = self._own() - self.own0
        self.cores = max(0.0, (busy - own) / wall) if wall > 0 else 0.0
        return False

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def prior_class():
    from wuerstchen_models import WuerstchenPrior

    return WuerstchenPrior


@torch.no_grad()
def tame_init(prior):
    """Like tools/make_tiny_models.make_prior_repo: no all-zero parameters (zero-initialised mappers
    and GRN gamma/beta) and a small output layer, so that the random prior behaves like a trained one
    (finite loss, non-zero gradients). Costs nothing in speed: every layer stays dense."""
    for p in prior.parameters():
        if p.numel() and not torch.any(p):
            p.normal_(0.0, 0.02)
    prior.out[1].weight.normal_(0.0, 0.02)
    prior.out[1].bias.zero_()


def build_prior(cfg, device="cpu", seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        prior = prior_class()(**cfg)
    if device != "meta":
        tame_init(prior)
    return prior


def lora_args(rank, gradient_checkpointing=False):
    """The namespace the trainer's add_lora reads: the trainer's own parser with its defaults (so that
    options it gains later get their default values), rank r, alpha r, the attention targets."""
    import train_wuerstchen_prior_lora as T

    argv = ["--dataset", "unused", "--rank", str(rank), "--lora_alpha", str(rank), "--lora_target_modules", ",".join(LORA_TARGETS)]
    if gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    try:
        return T.parse_args(argv)
    except SystemExit:  # a parser that no longer knows one of these flags
        return SimpleNamespace(rank=rank, lora_alpha=float(rank), lora_dropout=0.0, lora_target_modules=list(LORA_TARGETS), gradient_checkpointing=gradient_checkpointing)


def setup_training(prior, kind, rank, gradient_checkpointing=False):
    """kind "lora": the trainer's own add_lora (frozen prior, fp32 LoRA). kind "full": every prior
    parameter trainable. Returns the trainable parameters; the prior is left in train() mode."""
    import train_wuerstchen_prior_lora as T

    if kind == "lora":
        prior.requires_grad_(False)
        out = T.add_lora(prior, lora_args(rank, gradient_checkpointing))  # (config, params[, names])
        return list(out[1])
    prior.requires_grad_(True)
    if gradient_checkpointing:
        prior.enable_gradient_checkpointing()
    prior.train()
    return list(prior.parameters())


def make_optimizer(params, device="cpu"):
    # The trainer's defaults: lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8; fused on CUDA as in the trainer.
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=torch.device(device).type == "cuda")


def fixed_batch(batch, grid, c_cond, device="cpu", text_dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, 16, grid, grid, generator=g).to(device)
    text = torch.randn(batch, TOKENS, c_cond, generator=g).to(device, text_dtype)
    return emb, text


def count_params(cfg, rank=None):
    """(trainable, total) on the meta device: nothing is allocated, even for the real 1 B prior."""
    prior = build_prior(cfg, device="meta")
    if rank is None:
        n = sum(p.numel() for p in prior.parameters())
        return n, n
    from peft import LoraConfig

    prior.requires_grad_(False)
    prior.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    trainable = sum(p.numel() for p in prior.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in prior.parameters())


# ----------------------------------------------------------------------------------------------
# FLOP counting


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode, taught the CPU SDPA kernels.

    FlopCounterMode counts the CUDA SDPA kernels (flash, efficient, cudnn) but not the CPU one
    (aten._scaled_dot_product_flash_attention_for_cpu), which it would silently skip: register
    the library's own SDPA formulas for it.
    """
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=custom)


def analytic_forward_flops(model, *inputs, **kwargs):
    """Forward matmul/conv FLOPs of one call, from the shapes each layer sees (forward hooks).

    Linear: 2 * in_features * out_features per input row; Conv2d: 2 * (C_in / groups) * kh * kw
    per output element; attention (diffusers Attention): QK^T and AV, 2 * Lq * Lk * (heads * head_dim)
    each, per sample, Lk = image tokens + 77 text tokens in the prior's self+cross attention.
    Elementwise ops, norms and softmax are left out (as FlopCounterMode does). A training step costs
    about 3 x this with every weight trainable (backward = input grads + weight grads, each about a
    forward) and about 2 x this plus the LoRA layers when the base weights are frozen.
    """
    from diffusers.models.attention_processor import Attention
    from torch import nn

    total = [0]

    def linear(m, inp, out):
        total[0] += 2 * m.in_features * m.out_features * (inp[0].numel() // m.in_features)

    def conv(m, inp, out):
        kh, kw = m.kernel_size
        total[0] += 2 * (m.in_channels // m.groups) * kh * kw * out.numel()

    def attention(m, args, kw, out):
        hidden = args[0] if args else kw["hidden_states"]
        context = kw.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        batch = hidden.shape[0]
        lq = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        lk = context.shape[1] if context is not None else lq
        total[0] += 2 * 2 * batch * lq * lk * m.inner_dim

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def counted_flops(fn):
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# Models and data for the trainer runs


def make_scaled_prior_repo(path, seed=0):
    """A repo laid out like warp-ai/wuerstchen-prior (tools/make_tiny_models.make_prior_repo), with
    the scaled prior and a scaled CLIP text encoder (hidden = c_cond)."""
    from tools.make_tiny_models import make_prior_repo

    return make_prior_repo(path, seed=seed, prior=build_prior(SCALED_PRIOR, seed=seed), text_encoder=SCALED_TEXT)


def build_workdir(workdir, n_images, seed=0):
    """Scaled prior repo, real-size EfficientNetV2-S encoder and a captioned image dataset; reused if complete."""
    from tools.make_tiny_models import make_image_dataset, make_image_encoder

    workdir = Path(workdir)
    stamp = workdir / "bench_models.json"
    want = {"prior": SCALED_PRIOR, "text": SCALED_TEXT, "n_images": n_images, "seed": seed, "resolution": CPU_RES}
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("want") == json.loads(json.dumps(want)):
            return saved["paths"]
    t0 = time.perf_counter()
    paths = {
        "prior": make_scaled_prior_repo(workdir / "prior_repo", seed=seed),
        "image_encoder": make_image_encoder(workdir / "effnet.safetensors", seed=seed),
        # 320x256 pictures: the short side is already the training size, the centre crop takes 256x256.
        "dataset": make_image_dataset(workdir / "data", "imagefolder_jsonl", n=n_images, size=(320, CPU_RES), seed=seed),
    }
    stamp.write_text(json.dumps({"want": want, "paths": paths}, indent=2))
    log(f"built models and {n_images} images in {time.perf_counter() - t0:.0f} s under {workdir}")
    return paths


# ----------------------------------------------------------------------------------------------
# 1. The training loop, measured on the real script


def steps_per_epoch(args):
    return -(-args.n_images // CPU_BATCH)


def trainer_flags():
    env = script_env(1)
    out = subprocess.run([sys.executable, str(TRAIN), "--help"], check=False, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    text = out.stdout
    return {"cache": "--cache_embeddings" in text and "--no_cache_embeddings" in text, "cache_dir": "--embeddings_cache_dir" in text}


def script_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def trainer_argv(paths, steps, mode, flags, run_dir):
    argv = [
        "--pretrained_prior_model_name_or_path", paths["prior"],
        "--image_encoder", paths["image_encoder"],
        "--dataset", paths["dataset"],
        "--output_dir", str(run_dir / "out"),
        "--cache_dir", str(run_dir / "hf_cache"),
        "--resolution", str(CPU_RES), "--train_batch_size", str(CPU_BATCH), "--rank", str(CPU_RANK),
        "--center_crop", "--report_to", "none", "--checkpointing_steps", "0", "--max_train_steps", str(steps),
    ]  # fmt: skip
    if flags["cache"]:
        argv.append("--cache_embeddings" if mode == "cached" else "--no_cache_embeddings")
        if mode == "cached" and flags["cache_dir"]:
            argv += ["--embeddings_cache_dir", str(run_dir / "emb_cache")]
    return argv


def run_trainer(paths, steps, mode, flags, scratch, threads, tag):
    """One trainer run; returns its wall-clock seconds. Every run gets fresh output, datasets-cache and
    embeddings-cache folders, so both runs of a pair pay the same start-up and cache building."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=scratch))
    cmd = [sys.executable, str(TRAIN)] + trainer_argv(paths, steps, mode, flags, run_dir)
    # The progress bar (tqdm, on stderr) redraws after every optimiser step: reading it as it comes
    # gives the time at which each step finished, a start-up-free cross-check of the wall-clock method.
    stdout_path = run_dir / "stdout.txt"
    seen, chunks = {}, []
    t0 = time.perf_counter()
    with open(stdout_path, "wb") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=script_env(threads), cwd=str(ROOT))
        pending = b""
        while True:
            data = os.read(proc.stderr.fileno(), 65536)
            now = time.perf_counter()
            if not data:
                break
            chunks.append(data)
            pending += data
            *segments, pending = re.split(rb"[\r\n]", pending)
            for seg in segments:
                m = PROGRESS_RE.search(seg)
                if m and int(m.group(1)) not in seen:
                    seen[int(m.group(1))] = now - t0
        proc.wait(timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        err = b"".join(chunks).decode(errors="replace")
        raise RuntimeError(f"trainer failed ({proc.returncode}): {shlex.join(cmd)}\n{stdout_path.read_text()[-2000:]}\n{err[-4000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return wall, seen


def measure_loop(paths, args, flags, scratch, between=None):
    """Steady-state s/step per mode = (min wall(N2) - min wall(N1)) / (N2 - N1) over --loop_repeats.

    Also, from the long runs' progress bar (the time each step finished): the mean s/step from step
    N1 to N2 of each run, and every window of one epoch's steps in there, which is compared with the
    floor's windows of as many steps. `between` (the floor's timing block) runs after every trainer
    run, so that loop and floor are measured in the same stretch of time.
    """
    modes = ["uncached", "cached"] if flags["cache"] else ["uncached"]
    n1 = args.n1
    n2s = {"uncached": args.n2, "cached": args.n2_cached or args.n2}
    walls = {(m, n): [] for m in modes for n in (n1, n2s[m])}
    in_run = {m: [] for m in modes}
    in_windows = {m: [] for m in modes}
    loads = []
    for rep in range(args.loop_repeats):
        for mode in modes:
            n2 = n2s[mode]
            for n in (n1, n2) if rep % 2 == 0 else (n2, n1):
                with ForeignLoad() as fl:
                    wall, seen = run_trainer(paths, n, mode, flags, scratch, args.threads, f"{mode}-{n}")
                walls[(mode, n)].append(wall)
                loads.append(fl.cores)
                note = ""
                if n == n2 and n1 in seen and n2 in seen:
                    in_run[mode].append((seen[n2] - seen[n1]) / (n2 - n1))
                    in_windows[mode] += windows(seen, n1, n2, steps_per_epoch(args))
                    note = f", in-run {in_run[mode][-1]:.3f} s/step"
                log(f"  trainer {mode:8s} {n:3d} steps: {wall:6.1f} s  (foreign load {fl.cores:.2f} cores{note})")
                if between:
                    between()
    result = {}
    for mode in modes:
        n2 = n2s[mode]
        a, b = min(walls[(mode, n1)]), min(walls[(mode, n2)])
        per = (b - a) / (n2 - n1)
        pairs = [(y - x) / (n2 - n1) for x, y in zip(walls[(mode, n1)], walls[(mode, n2)])]
        result[mode] = {
            "s_per_step": per, "n2": n2, "wall_n1": a, "wall_n2": b, "startup": a - n1 * per, "pairs": pairs,
            "in_run_all": in_run[mode],
            "fastest": min(in_windows[mode]) if in_windows[mode] else None,
            "median": statistics.median(in_windows[mode]) if in_windows[mode] else None,
        }  # fmt: skip
    result["foreign_load"] = max(loads) if loads else 0.0
    return result


def loop_probe(argv, skip):
    """Runs in its own process: the trainer's main() on `argv`, with timers around the prior's forward
    (class-level wrapper), Tensor.backward and every optimiser step (torch's global optimiser hooks).
    Each step is split into: prior forward, loss and checks up to backward, backward, clipping and the
    like up to the optimiser, the optimiser step, and the rest (data, seeding, logging, progress bar)
    until the next forward. Measured within the same steps, so a busy machine slows all parts alike."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    import train_wuerstchen_prior_lora as T

    prior_cls = prior_class()
    marks = []
    now = time.perf_counter
    forward = prior_cls.forward

    def timed_forward(self, *a, **k):
        if not (self.training and torch.is_grad_enabled()):
            return forward(self, *a, **k)
        marks.append(("fwd0", now()))
        out = forward(self, *a, **k)
        marks.append(("fwd1", now()))
        return out

    backward = torch.Tensor.backward

    def timed_backward(self, *a, **k):
        marks.append(("bwd0", now()))
        out = backward(self, *a, **k)
        marks.append(("bwd1", now()))
        return out

    prior_cls.forward = timed_forward
    torch.Tensor.backward = timed_backward
    register_optimizer_step_pre_hook(lambda opt, a, k: marks.append(("opt0", now())))
    register_optimizer_step_post_hook(lambda opt, a, k: marks.append(("opt1", now())))
    rc = T.main(argv)
    # One step = the events from one fwd0 to the next fwd0.
    steps, cur = [], None
    for name, t in marks:
        if name == "fwd0":
            if cur is not None:
                steps.append(dict(cur, next=t))
            cur = {}
        if cur is not None and name not in cur:
            cur[name] = t
    parts = {"forward": [], "loss_and_checks": [], "backward": [], "clip_and_other": [], "optimizer": [], "data_logging_rest": [], "step": []}
    for st in steps[skip:]:
        if not all(k in st for k in ("fwd0", "fwd1", "bwd0", "bwd1", "opt0", "opt1")):
            continue
        parts["forward"].append(st["fwd1"] - st["fwd0"])
        parts["loss_and_checks"].append(st["bwd0"] - st["fwd1"])
        parts["backward"].append(st["bwd1"] - st["bwd0"])
        parts["clip_and_other"].append(st["opt0"] - st["bwd1"])
        parts["optimizer"].append(st["opt1"] - st["opt0"])
        parts["data_logging_rest"].append(st["next"] - st["opt1"])
        parts["step"].append(st["next"] - st["fwd0"])
    print("LOOP_PROBE " + json.dumps({"rc": rc, "steps": len(parts["step"]), "totals": {k: sum(v) for k, v in parts.items()}, "medians": {k: statistics.median(v) if v else None for k, v in parts.items()}}), flush=True)


def measure_breakdown(paths, args, flags, scratch):
    mode = "cached" if flags["cache"] else "uncached"
    run_dir = Path(tempfile.mkdtemp(prefix="breakdown-", dir=scratch))
    steps = args.n1 + args.breakdown_steps
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_loop_probe", json.dumps(trainer_argv(paths, steps, mode, flags, run_dir)), "--n1", str(args.n1), "--threads", str(args.threads)]
    with ForeignLoad() as fl:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=script_env(args.threads), cwd=str(ROOT), timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LOOP_PROBE ")), None)
    shutil.rmtree(run_dir, ignore_errors=True)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"loop probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("LOOP_PROBE ") :])
    out.update(mode=mode, foreign_load=fl.cores)
    return out


# ----------------------------------------------------------------------------------------------
# 2. The bare floor


class Floor:
    """Prior forward + backward + AdamW step + zero_grad on one fixed batch, in-process: the trainer's
    own add_lora and compute_loss on the same prior, SDPA attention as in the trainer, nothing else."""

    def __init__(self, paths, args):
        from diffusers import DDPMWuerstchenScheduler

        import train_wuerstchen_prior_lora as T
        from wuerstchen_models import use_sdpa_attention

        self.args = args
        prior = prior_class().from_pretrained(paths["prior"], subfolder="prior") if paths else build_prior(SCALED_PRIOR)
        prior.requires_grad_(False)
        use_sdpa_attention(prior)  # as T.load_frozen_models does
        torch.manual_seed(0)  # the LoRA initialisation
        params = setup_training(prior, "lora", CPU_RANK)
        optimizer = make_optimizer(params)
        scheduler = DDPMWuerstchenScheduler()
        emb, text = fixed_batch(CPU_BATCH, CPU_RES // 32, SCALED_PRIOR["c_cond"])

        def loss_backward():
            T.compute_loss(prior, scheduler, emb, text).backward()

        def step():
            loss_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        self.step, self.times, self.loads, self.windows = step, [], [], []
        self.window = steps_per_epoch(args)
        for _ in range(args.floor_warmup):
            step()
        # FLOPs of one step (forward + backward, counted), for the achieved-GFLOP/s line.
        self.flops = counted_flops(loss_backward)
        optimizer.zero_grad(set_to_none=True)

    def block(self):
        """--floor_steps consecutive steps, timestamped; keeps every window of `self.window` steps."""
        time.sleep(1.0)  # let the kernel finish tearing down the trainer process that just exited
        # A block starts right after a trainer process ran, with cold caches; the loop's windows start
        # --n1 steps into a warm run, so the floor's start after a few untimed steps too. (This did not
        # narrow the spread of block means on the 2-core VM, 0.14-0.20 s/step against 0.141 with no
        # trainer runs in between: that spread comes from the machine, and the loop sees it as well.)
        for _ in range(self.args.floor_block_warmup):
            self.step()
        stamps = [time.perf_counter()]
        with ForeignLoad() as fl:
            for _ in range(self.args.floor_steps):
                self.step()
                stamps.append(time.perf_counter())
        self.windows += windows(dict(enumerate(stamps)), 0, len(stamps) - 1, self.window)
        self.times.append((stamps[-1] - stamps[0]) / self.args.floor_steps)
        self.loads.append(fl.cores)

    def result(self):
        return {
            "fastest": min(self.windows), "median": statistics.median(self.windows), "blocks": len(self.times),
            "block_range": (min(self.times), max(self.times)), "flops": self.flops, "foreign_load": max(self.loads),
        }  # fmt: skip


def windows(stamps, first, last, width):
    """s/step of every run of `width` consecutive steps between step `first` and step `last`.

    stamps: {step: time it finished}. With width = steps per epoch every window holds exactly one
    epoch boundary, so per-epoch costs are in every window.
    """
    return [(stamps[k + width] - stamps[k]) / width for k in range(first, last - width + 1) if k in stamps and k + width in stamps]


# ----------------------------------------------------------------------------------------------
# 2b. Building the embedding cache: one image per EfficientNet call versus batches


def measure_cache_build(paths, args, batch_sizes=(1, 8), repeats=2):
    """Seconds per image of the trainer's build_cache over the benchmark's images (centre crop, no
    flip) for each --cache_batch_size, alternating the sizes; the fastest of `repeats` builds counts."""
    from accelerate import Accelerator

    import train_wuerstchen_prior_lora as T
    from embedding_cache import build_cache
    from wuerstchen_data import load_training_dataset
    from wuerstchen_models import load_image_encoder, load_prior_components

    _, text_encoder, tokenizer, _ = load_prior_components(paths["prior"])
    image_encoder = load_image_encoder(paths["image_encoder"]).eval()
    dataset, image_column, caption_column = load_training_dataset(paths["dataset"])
    accelerator = Accelerator(cpu=True)
    run = SimpleNamespace(accelerator=accelerator, dtype=torch.float32, image_encoder=image_encoder, text_encoder=text_encoder, tokenizer=tokenizer)
    encode_image, encode_text = T.encoder_functions(run)  # as the trainer builds its cache
    times = {b: [] for b in batch_sizes}
    with tempfile.TemporaryDirectory(prefix="cache-build-") as tmp, torch.no_grad():
        for r in range(repeats):
            for b in batch_sizes:
                cache_args = T.parse_args(["--dataset", paths["dataset"], "--resolution", str(CPU_RES), "--center_crop", "--cache_batch_size", str(b)])
                with ForeignLoad() as fl, open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # no progress bar
                    t0 = time.perf_counter()
                    build_cache(os.path.join(tmp, f"{b}-{r}"), dataset, image_column, caption_column, cache_args, encode_image, encode_text, accelerator)
                    times[b].append((time.perf_counter() - t0) / len(dataset))
                log(f"  cache build, batch {b}: {times[b][-1]:.3f} s/image (foreign load {fl.cores:.2f} cores)")
    return {"s_per_image": {b: min(v) for b, v in times.items()}, "images": len(dataset)}


# ----------------------------------------------------------------------------------------------
# 3. Peak memory, LoRA versus full fine-tuning (each in a fresh process)
#
# Two measures. The headline one is the peak of live tensor bytes, the CPU counterpart of
# torch.cuda.max_memory_allocated: the profiler's memory events (every allocation and free the CPU
# allocator makes, with its size) summed in time order. The other is the process's peak RSS, which
# also counts what glibc keeps after a free: its mmap threshold rises to the size of the largest
# freed block, so later blocks of that size come from the heap and stay resident after they are
# freed. That is allocator slack, not memory training needs, and it differs between runs.

MEMORY_PRECISIONS = ("fp32", "bf16")


def rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM, which ru_maxrss reports) to now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_tensor_bytes(fn):
    """Runs fn() under the profiler; returns (peak, end): the most tensor bytes live at any moment
    above those live at the start, and the bytes still live at the end. PyTorch keeps no allocation
    statistics for the CPU (torch.cuda.max_memory_allocated has no CPU twin), so they are summed from
    the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def memory_probe(kind, gradient_checkpointing, threads, precision="fp32", steps=3):
    """Runs in its own process. Sets the scaled prior up for LoRA or full fine-tuning as the trainer
    would at `precision`, trains `steps` steps on one batch and reports the peak memory above what
    exists before the first step (prior, batch; the AdamW state appears at the first step).

    precision "bf16" is mixed precision as the trainer runs it on a GPU: LoRA keeps the frozen prior in
    bf16 and its own weights in fp32; full fine-tuning keeps fp32 master weights (nothing is frozen
    to cast); both run the forward under bf16 autocast. A tiny model trains first so that the
    library code and kernels it pages in are not counted."""
    from diffusers import DDPMWuerstchenScheduler

    import train_wuerstchen_prior_lora as T
    from wuerstchen_models import quiet_library_logs, use_sdpa_attention

    torch.set_num_threads(threads)
    quiet_library_logs()  # diffusers warns about .to(bf16) on a model
    scheduler = DDPMWuerstchenScheduler()
    half = precision == "bf16"

    def setup(cfg, batch, grid):
        prior = build_prior(cfg)
        use_sdpa_attention(prior)
        if half and kind == "lora":
            prior.to(torch.bfloat16)  # the trainer's load_frozen_models; add_lora puts the LoRA weights back in fp32
        params = setup_training(prior, kind, CPU_RANK, gradient_checkpointing)
        emb, text = fixed_batch(batch, grid, cfg["c_cond"], text_dtype=torch.bfloat16 if half and kind == "lora" else torch.float32)
        return prior, params, make_optimizer(params), emb, text

    def steps_fn(prior, optimizer, emb, text, n):
        def run():
            for _ in range(n):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                    loss = T.compute_loss(prior, scheduler, emb, text)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    prior, params, optimizer, emb, text = setup(dict(SCALED_PRIOR, c=48, depth=1), 2, 4)
    steps_fn(prior, optimizer, emb, text, 2)()  # warm-up: page in code and kernels
    del prior, params, optimizer, emb, text

    # Pass 1, peak RSS (no profiler running: its event buffers would count).
    prior, params, optimizer, emb, text = setup(SCALED_PRIOR, CPU_BATCH, CPU_RES // 32)
    gc.collect()
    base = rss_kb("VmRSS")
    clean = reset_peak_rss()
    steps_fn(prior, optimizer, emb, text, steps)()
    # VmHWM is the peak that clear_refs resets; ru_maxrss also folds in the peak of exited threads'
    # time (signal_struct maxrss), which no reset clears: use VmHWM when the reset worked.
    peak_rss = rss_kb("VmHWM") if clean else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del prior, params, optimizer, emb, text
    gc.collect()

    # Pass 2, live tensor bytes, on a fresh prior and optimiser.
    prior, params, optimizer, emb, text = setup(SCALED_PRIOR, CPU_BATCH, CPU_RES // 32)
    gc.collect()
    start = nbytes(prior.parameters()) + nbytes(prior.buffers()) + emb.nbytes + text.nbytes
    peak, end = peak_tensor_bytes(steps_fn(prior, optimizer, emb, text, steps))
    trainable = sum(p.numel() for p in params)
    state = nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    out = {
        "kind": kind, "gc": gradient_checkpointing, "precision": precision, "trainable": trainable,
        "weights_bytes": nbytes(prior.parameters()), "start_bytes": start, "peak_increase_bytes": peak, "peak_total_bytes": start + peak,
        "end_increase_bytes": end, "optimizer_state_bytes": state,
        "rss_increase_kb": peak_rss - base, "rss_base_kb": base, "rss_peak_reset": clean,
    }  # fmt: skip
    print("MEMORY_PROBE " + json.dumps(out), flush=True)


def measure_memory(args):
    variants = [(kind, gc_on, prec) for prec in MEMORY_PRECISIONS for gc_on in ((False,) if args.no_checkpointing_memory else (False, True)) for kind in ("lora", "full")]
    results = {}
    for kind, gc_on, prec in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory_probe", kind, "--_memory_precision", prec, "--threads", str(args.threads)]
        if gc_on:
            cmd.append("--gradient_checkpointing")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=script_env(args.threads), cwd=str(ROOT), timeout=1200)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY_PROBE ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory probe {kind} {prec} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        r = results[(kind, gc_on, prec)] = json.loads(line[len("MEMORY_PROBE ") :])
        # A check that the events were all seen: what is still live after the steps is the AdamW state.
        if abs(r["end_increase_bytes"] - r["optimizer_state_bytes"]) > 2**20:
            raise RuntimeError(f"memory probe {kind} {prec}: {r['end_increase_bytes']} bytes live after the steps, but the AdamW state is {r['optimizer_state_bytes']}: the allocation events are incomplete")
        log(f"  memory {kind} {prec}{' +GC' if gc_on else ''}: peak tensors +{r['peak_increase_bytes'] / 2**20:.1f} MiB (total {r['peak_total_bytes'] / 2**20:.1f} MiB), RSS +{r['rss_increase_kb'] / 1024:.1f} MiB")
    return results


# ----------------------------------------------------------------------------------------------
# 4. Forward latency: base, unmerged LoRA, fused LoRA


def latency_variants(cfg, device, dtype, rank, seed=0):
    """Three priors with the same base weights: base, + unmerged LoRA (peft), + fused LoRA
    (diffusers PeftAdapterMixin.fuse_lora then unload_lora, what infer.py --fuse_lora does). lora_B is random (not
    the zero init) so that the check that fused == unmerged != base means something."""
    from peft import LoraConfig

    from wuerstchen_models import use_sdpa_attention

    base = build_prior(cfg, device=device, seed=seed).to(dtype).eval().requires_grad_(False)
    use_sdpa_attention(base)
    lora = copy.deepcopy(base)
    lora.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p))
    lora = lora.to(dtype).eval().requires_grad_(False)
    fused = copy.deepcopy(lora)
    fused.fuse_lora()
    fused.unload_lora()  # what infer.py --fuse_lora does: merged weights, no adapter wrappers left
    return {"base": base, "unmerged LoRA": lora, "fused LoRA": fused}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_latency(cfg, device, dtype, batch, grid, rank, repeats, warmup=3):
    models = latency_variants(cfg, device, dtype, rank)
    emb, text = fixed_batch(batch, grid, cfg["c_cond"], device=device, text_dtype=dtype)
    # Timesteps in the model dtype, as WuerstchenPriorPipeline passes them (no autocast at inference).
    x, t = emb.to(dtype), torch.full((batch,), 0.5, device=device, dtype=dtype)
    outs = {k: m(x, t, text).float() for k, m in models.items()}
    delta = (outs["unmerged LoRA"] - outs["base"]).norm().item()
    check = {
        # how far the LoRA moves the output, and how far the fused model is from the unmerged one,
        # both relative to the size of the output
        "lora_vs_base": delta / outs["base"].norm().item(),
        "fused_vs_unmerged": (outs["fused LoRA"] - outs["unmerged LoRA"]).norm().item() / outs["unmerged LoRA"].norm().item(),
    }
    names = list(models)
    for _ in range(warmup):
        for name in names:
            models[name](x, t, text)
    times = {n: [] for n in names}
    with ForeignLoad() as fl:
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
            for name in order:
                sync(device)
                t0 = time.perf_counter()
                models[name](x, t, text)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    # Paired ratios per round cancel slow drifts of the machine's speed.
    paired = {n: statistics.median(a / b for a, b in zip(times[n], times["base"])) for n in names}
    return {"median": med, "paired": paired, "check": check, "foreign_load": fl.cores, "repeats": repeats}


# ----------------------------------------------------------------------------------------------
# 5. The device benchmark (real prior on a GPU; --smoke_device_path runs it on the CPU, tiny)


# ----------------------------------------------------------------------------------------------
# Output


def fmt_flops(x):
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


def fmt_cfg(cfg):
    return f"c {cfg['c']}, c_cond {cfg['c_cond']}, depth {cfg['depth']}, nhead {cfg['nhead']}"


def verdict(ok):
    return "met" if ok else "MISSED"


def print_header(args):
    import diffusers
    import peft
    import transformers

    print("# Wuerstchen prior LoRA benchmark\n")
    print(f"command: {shlex.join([Path(sys.executable).name] + sys.argv)}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores ({affinity} usable), {platform.system()} {platform.release()}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")
    print(f"torch threads: {torch.get_num_threads()} (also OMP_NUM_THREADS/MKL_NUM_THREADS of the subprocesses); load average at start {loadavg():.2f}")
    if args.device == "cuda" and torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")


def print_params():
    print("\n## Trainable parameters (attention LoRA on to_q, to_k, to_v, to_out.0; counted on the meta device)\n")
    print("| prior | setting | trainable | total | fraction |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, cfg in (("scaled", SCALED_PRIOR), ("real", REAL_PRIOR)):
        base, _ = count_params(cfg)
        print(f"| {label} ({fmt_cfg(cfg)}) | full fine-tuning | {base:,} | {base:,} | 100 % |")
        for rank in (4, 8):
            tr, tot = count_params(cfg, rank)
            note = ""
            if cfg is REAL_PRIOR:
                note = " (= 393,216 x r)" if tr == 393_216 * rank else f" (REFERENCE says {393_216 * rank:,})"
            print(f"| {label} | LoRA r{rank} | {tr:,}{note} | {tot:,} | {100 * tr / tot:.3f} % |")


def print_latency(lat, what):
    print(f"\n## Prior forward latency ({what}; eval, no_grad; median of {lat['repeats']} interleaved runs)\n")
    print("| variant | median ms | / base (ratio of medians) | / base (median of paired ratios) |")
    print("| --- | ---: | ---: | ---: |")
    base = lat["median"]["base"]
    for name, t in lat["median"].items():
        print(f"| {name} | {1000 * t:.2f} | {t / base:.3f} | {lat['paired'][name]:.3f} |")
    c = lat["check"]
    print(f"check: |unmerged - base| / |base| = {c['lora_vs_base']:.2e} (the LoRA does something), |fused - unmerged| / |unmerged| = {c['fused_vs_unmerged']:.2e} (fusing keeps it); foreign load during timing {lat['foreign_load']:.2f} cores")


def print_cpu_results(args, flags, loop, floor, memory, latency, extra, breakdown=None, cache_build=None):
    targets = []
    print(f"\n## CPU figures: scaled prior ({fmt_cfg(SCALED_PRIOR)}, c_r 64, {count_params(SCALED_PRIOR)[0] / 1e6:.2f} M params), {CPU_RES} px ({CPU_RES // 32}x{CPU_RES // 32} grid), batch {CPU_BATCH}, LoRA r{CPU_RANK}, fp32\n")
    print(
        f"Trainer runs: text encoder SCALED (CLIP hidden {SCALED_TEXT['hidden_size']} = c_cond, {SCALED_TEXT['num_hidden_layers']} layers, "
        f"{SCALED_TEXT['num_attention_heads']} heads, MLP {SCALED_TEXT['intermediate_size']}; the real one is hidden 1280, 32 layers, 20 heads, MLP 5120), "
        f"image encoder REAL-size EfficientNetV2-S (random weights), {args.n_images} images of 320x256, --center_crop."
    )
    if extra:
        e = extra
        # Caching removes the encoders' forward; a LoRA step still pays the prior's forward + backward (about 2 x forward).
        print(
            f"Forward FLOPs per sample (FlopCounterMode): here EfficientNetV2-S at {CPU_RES} px {e['effnet'] / 1e9:.2f} G + scaled text encoder {e['text'] / 1e9:.3f} G "
            f"vs scaled prior {e['prior'] / 1e9:.2f} G; real models at 768 px: EfficientNet {e['real_effnet'] / 1e9:.1f} G + CLIP bigG text {e['real_text'] / 1e9:.1f} G "
            f"vs prior {e['real_prior'] / 1e9:.0f} G. So the encoders cost about {(e['effnet'] + e['text']) / (2 * e['prior']):.1f} x a LoRA prior step here, "
            f"and about {100 * (e['real_effnet'] + e['real_text']) / (2 * e['real_prior']):.0f} % of one on the real models: the cached speed-up measured here is much larger than on real models."
        )
    print("\n| figure | value | target | verdict |")
    print("| --- | ---: | --- | --- |")
    c = cl = None
    if loop:
        u = loop["uncached"]["s_per_step"]
        cl = loop.get("cached")
        print(f"| training loop, uncached: wall-clock difference (s/step) | {u:.3f} | | |")
        if cl:
            c = cl["s_per_step"]
            print(f"| training loop, cached: wall-clock difference (s/step) | {c:.3f} | | |")
            if cl["fastest"]:
                print(f"| training loop, cached: in-run epoch windows, fastest / median (s/step) | {cl['fastest']:.3f} / {cl['median']:.3f} | | |")
        else:
            print("| training loop, cached (s/step) | n/a (trainer has no --cache_embeddings yet) | | |")
    if floor:
        f = floor["median"]
        print(f"| bare floor: fwd + bwd + AdamW, epoch windows, fastest / median (s/step) | {floor['fastest']:.3f} / {f:.3f} | | |")
        print(f"| floor throughput (counted fwd+bwd FLOPs / median time) | {floor['flops'] / f / 1e9:.1f} GFLOP/s | | |")
    if loop and floor:
        if cl and cl["median"]:
            ratio = cl["median"] / f
            ok = ratio <= TARGETS["loop_over_floor"]
            targets.append(ok)
            print(f"| cached loop / floor: median epoch windows (like for like) | {ratio:.3f} x | <= {TARGETS['loop_over_floor']:.2f} x | {verdict(ok)} |")
            print(f"| cached loop / floor: fastest epoch windows | {cl['fastest'] / floor['fastest']:.3f} x | | |")
        # The wall-clock difference takes the shortest runs: set it against the fastest floor window.
        if c is not None:
            print(f"| cached loop / floor: wall-clock difference / fastest window | {c / floor['fastest']:.3f} x | | |")
        print(f"| uncached loop / floor: wall-clock difference / fastest window | {u / floor['fastest']:.3f} x | | |")
    if loop and c is not None:
        ok = u / c >= TARGETS["cached_speedup"]
        targets.append(ok)
        print(f"| uncached / cached: wall-clock differences | {u / c:.2f} x | >= {TARGETS['cached_speedup']:.0f} x | {verdict(ok)} |")
        if cl["median"] and loop["uncached"]["median"]:
            print(f"| uncached / cached: median epoch windows | {loop['uncached']['median'] / cl['median']:.2f} x | | |")
    if breakdown:
        t = breakdown["totals"]
        core = t["forward"] + t["backward"] + t["optimizer"]
        print(f"| {breakdown['mode']} loop, step time / (prior fwd + bwd + optimizer) in the same steps | {t['step'] / core:.3f} x | | |")
    if cache_build:
        per = cache_build["s_per_image"]
        one, many = per[min(per)], per[max(per)]
        print(f"| building the embedding cache, 1 image per call (s/image) | {one:.3f} | | |")
        print(f"| same, --cache_batch_size {max(per)} (s/image) | {many:.3f} | | |")
    if memory:

        def ratio(field, gc_on, prec):
            lo, fu = memory.get(("lora", gc_on, prec)), memory.get(("full", gc_on, prec))
            return lo[field] / fu[field] if lo and fu else None

        r = ratio("peak_total_bytes", False, "bf16")
        ok = r <= TARGETS["memory_fraction"]
        targets.append(ok)
        print(f"| peak memory LoRA / full fine-tuning, bf16 mixed precision as trained (live tensors, weights included) | {r:.3f} | <= 0.333 | {verdict(ok)} |")
        rows = [
            ("same, fp32 (weights included)", "peak_total_bytes", False, "fp32"),
            ("same, fp32, memory training adds above the loaded prior", "peak_increase_bytes", False, "fp32"),
            ("same, fp32, peak RSS increase (with glibc's heap slack)", "rss_increase_kb", False, "fp32"),
            ("same, bf16, both with gradient checkpointing (weights included)", "peak_total_bytes", True, "bf16"),
        ]
        for label, field, gc_on, prec in rows:
            x = ratio(field, gc_on, prec)
            if x is not None:
                print(f"| {label} | {x:.3f} | (not judged) | |")
    if latency:
        m = latency["median"]
        ok = m["fused LoRA"] / m["base"] <= TARGETS["fused_latency"]
        targets.append(ok)
        print(f"| forward latency unmerged LoRA / base | {m['unmerged LoRA'] / m['base']:.3f} x | | |")
        print(f"| forward latency fused LoRA / base | {m['fused LoRA'] / m['base']:.3f} x | <= {TARGETS['fused_latency']:.2f} x | {verdict(ok)} |")

    if loop:
        w = steps_per_epoch(args)
        print(
            f"\nLoop: wall-clock difference = (wall(N2) - wall(N1 = {args.n1})) / (N2 - N1), shortest wall of {args.loop_repeats} runs per length. "
            f"In-run: times at which the progress bar showed each step; an epoch window is {w} consecutive steps ({args.n_images} images / batch {CPU_BATCH}), "
            f"so each holds one epoch boundary. The floor is timed in the same windows, in blocks between the trainer runs."
        )
        for mode in ("uncached", "cached"):
            if mode in loop:
                r = loop[mode]
                pairs = ", ".join(f"{x:.3f}" for x in r["pairs"])
                runs = ", ".join(f"{x:.3f}" for x in r["in_run_all"]) or "n/a"
                print(f"  {mode}: N2 {r['n2']}; shortest walls {r['wall_n1']:.1f} s / {r['wall_n2']:.1f} s, start-up incl. loading about {r['startup']:.1f} s; s/step of each run pair {pairs}; mean s/step N1..N2 of each long run {runs}")
        print(f"  max foreign load during the runs: {loop['foreign_load']:.2f} cores")
    if floor:
        lo_, hi_ = floor["block_range"]
        print(
            f"Floor: {floor['blocks']} blocks of {args.floor_steps} steps after {args.floor_warmup} warm-up steps, each block after {args.floor_block_warmup} more (block means {lo_:.3f}-{hi_:.3f} s/step); "
            f"fwd+bwd {floor['flops'] / 1e9:.2f} GFLOP/step; max foreign load {floor['foreign_load']:.2f} cores"
        )
    if breakdown:
        t, m = breakdown["totals"], breakdown["medians"]
        n = breakdown["steps"]
        print(f"\n## Where a {breakdown['mode']} training step goes (the trainer's main() in-process with timers; {n} steps after {args.n1}; foreign load {breakdown['foreign_load']:.2f} cores)\n")
        print("| part | mean ms/step | median ms | share |")
        print("| --- | ---: | ---: | ---: |")
        labels = {
            "forward": "prior forward (incl. LoRA)", "loss_and_checks": "loss, finite check (to backward)", "backward": "backward",
            "clip_and_other": "gradient clipping etc. (to optimiser)", "optimizer": "optimiser step", "data_logging_rest": "data, seeding, noise sampling, logging, progress bar (to next forward)",
        }  # fmt: skip
        for key, label in labels.items():
            print(f"| {label} | {1000 * t[key] / n:.1f} | {1000 * m[key]:.1f} | {100 * t[key] / t['step']:.1f} % |")
        print(f"| whole step | {1000 * t['step'] / n:.1f} | {1000 * m['step']:.1f} | 100 % |")
    if memory:
        print(
            f"\n## Peak memory of training (CPU, a fresh process per row, {CPU_BATCH} images at {CPU_RES} px, 3 steps of AdamW)\n\n"
            "Live tensors: the most tensor bytes live at once, summed from the allocator's events (the CPU twin of "
            "torch.cuda.max_memory_allocated); 'total' adds what was live before the first step (weights, batch). "
            "RSS: the process's peak resident memory above the same point, which also holds freed blocks glibc keeps. "
            "bf16 = mixed precision as the trainer runs it: LoRA over a frozen bf16 prior, full fine-tuning with fp32 master weights, both under bf16 autocast.\n"
        )
        print("| setting | precision | trainable params | weights | peak above start | peak total | RSS increase | AdamW state |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for (kind, gc_on, prec), r in memory.items():
            name = (f"LoRA r{CPU_RANK}" if kind == "lora" else "full fine-tuning") + (" + grad ckpt" if gc_on else "")
            note = "" if r["rss_peak_reset"] else " (peak not reset)"
            print(
                f"| {name} | {prec} | {r['trainable']:,} | {r['weights_bytes'] / 2**20:.1f} MiB | {r['peak_increase_bytes'] / 2**20:.1f} MiB | "
                f"{r['peak_total_bytes'] / 2**20:.1f} MiB | {r['rss_increase_kb'] / 1024:.1f} MiB{note} | {r['optimizer_state_bytes'] / 2**20:.1f} MiB |"
            )
        print(
            "Full fine-tuning adds fp32 gradients and two AdamW moments per weight; LoRA adds them only for its own weights, and PyTorch "
            "saves no inputs for the frozen layers' weight gradients. At this size activations are a large share of both, so the fp32 "
            "ratio with weights included stays far above the real prior's, where weights and optimiser state dominate."
        )
    if latency:
        print_latency(latency, f"scaled prior, batch {CPU_BATCH}, {CPU_RES // 32}x{CPU_RES // 32} grid, fp32")
    if targets:
        print(f"\ntargets met: {sum(targets)} of {len(targets)}")


def extra_flops(paths):
    """Per-sample forward FLOPs of the encoders and the prior, scaled (as benchmarked) and real (counted
    on the meta device: shapes only, nothing computed), to put cached versus uncached in proportion."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from wuerstchen_models import (
        EfficientNetEncoder,
        load_image_encoder,
        use_sdpa_attention,
    )

    def prior_flops(cfg, grid, device):
        prior = build_prior(cfg, device=device).eval()
        use_sdpa_attention(prior)
        with torch.device(device):
            emb, text = torch.zeros(1, 16, grid, grid), torch.zeros(1, TOKENS, cfg["c_cond"])
            t = torch.full((1,), 0.5)
        return counted_flops(lambda: prior(emb, t, text))

    def text_flops(model, device):
        return counted_flops(lambda: model(torch.zeros(1, TOKENS, dtype=torch.long, device=device)))

    with torch.no_grad():
        effnet = load_image_encoder(paths["image_encoder"])
        out = {"effnet": counted_flops(lambda: effnet(torch.zeros(1, 3, CPU_RES, CPU_RES)))}
        te = CLIPTextModel.from_pretrained(paths["prior"], subfolder="text_encoder").eval()
        out["text"] = text_flops(te, "cpu")
        out["prior"] = prior_flops(SCALED_PRIOR, CPU_RES // 32, "cpu")
        with torch.device("meta"):
            real_effnet = EfficientNetEncoder().eval()
            real_te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=TOKENS, hidden_act="gelu", **REAL_TEXT)).eval()
        out["real_effnet"] = counted_flops(lambda: real_effnet(torch.zeros(1, 3, 32 * GPU_GRID, 32 * GPU_GRID, device="meta")))
        out["real_text"] = text_flops(real_te, "meta")
        out["real_prior"] = prior_flops(REAL_PRIOR, GPU_GRID, "meta")
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: scaled prior figures; cuda: the real prior on a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads here and OMP/MKL threads of the subprocesses (default 1: robust on a shared machine; with N threads and another busy process, OpenMP timings swing by 10x)")
    p.add_argument("--only", default="loop,floor,breakdown,cache,memory,latency,flops,params", help="comma-separated CPU sections: loop, floor, breakdown, cache, memory, latency, flops, params")
    p.add_argument("--workdir", default=None, help="where the models and images are built (kept, and reused if complete); default: a temporary folder")
    p.add_argument("--n_images", type=int, default=32)
    p.add_argument("--n1", type=int, default=5, help="steps of the short trainer run")
    p.add_argument("--n2", type=int, default=45, help="steps of the long trainer run (uncached)")
    p.add_argument("--n2_cached", type=int, default=125, help="steps of the long trainer run, cached (faster steps: more of them for the same precision)")
    p.add_argument("--loop_repeats", type=int, default=3, help="trainer run pairs per mode (min wall per length)")
    p.add_argument("--floor_warmup", type=int, default=3)
    p.add_argument("--floor_steps", type=int, default=16, help="steps per floor block (one block before the trainer runs and one after each)")
    p.add_argument("--floor_block_warmup", type=int, default=3, help="untimed steps at the start of every floor block")
    p.add_argument("--latency_repeats", type=int, default=90)
    p.add_argument("--no_checkpointing_memory", action="store_true", help="CPU memory: skip the gradient-checkpointing rows")
    g = p.add_argument_group("device (--device cuda): bench/device_bench.py")
    g.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU for MFU (989: H100/H200 SXM)")
    g.add_argument("--modes", default=None, help="comma-separated trainer modes (device_bench.MODES); default: eager bf16 and fp16, compile default and reduce-overhead, checkpointing 1, 0.5, 0.25")
    g.add_argument("--steps", type=int, default=None, help="training steps per trainer run (default 60; smoke 6)")
    g.add_argument("--compile_backend", default=None, help="torch.compile backend of the compile modes (default inductor; smoke: aot_eager, which compiles in seconds)")
    g.add_argument("--out", default=None, help="folder for results.json and results.md (default bench/device_results or bench/smoke_results)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="CPU memory probe: checkpoint this probe")
    g.add_argument("--smoke_device_path", action="store_true", help="run the --device cuda code path on the CPU with tiny sizes (a check, not a figure)")
    p.add_argument("--breakdown_steps", type=int, default=40, help="steps timed part by part in the loop breakdown (after --n1 warm-up steps)")
    p.add_argument("--_memory_probe", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--_memory_precision", choices=MEMORY_PRECISIONS, default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--_loop_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args._memory_probe:
        memory_probe(args._memory_probe, args.gradient_checkpointing, args.threads, args._memory_precision)
        return 0
    if args._loop_probe:
        loop_probe(json.loads(args._loop_probe), args.n1)
        return 0

    import warnings

    from wuerstchen_models import quiet_library_logs

    warnings.filterwarnings("ignore")
    quiet_library_logs()
    print_header(args)

    if args.smoke_device_path or args.device == "cuda":
        import device_bench

        return device_bench.run(args)

    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"loop", "floor", "breakdown", "cache", "memory", "params", "latency", "flops"}
    if unknown:
        p.error(f"--only: unknown sections {sorted(unknown)}")
    t_start = time.perf_counter()
    if loadavg() > 0.5 * args.threads:
        log(f"warning: load average {loadavg():.2f} before timing; other processes will skew the figures")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wuerstchen-bench-")))
        scratch = workdir / "runs"
        scratch.mkdir(exist_ok=True)
        need_models = sections & {"loop", "floor", "breakdown", "cache", "flops"}
        paths = build_workdir(workdir, args.n_images) if need_models else None

        loop = floor = memory = latency = extra = None
        flags = trainer_flags() if sections & {"loop", "breakdown"} else {"cache": False, "cache_dir": False}
        bench_floor = None
        if "floor" in sections:
            log("bare floor (timed in blocks between the trainer runs)")
            bench_floor = Floor(paths, args)
            bench_floor.block()
        if "loop" in sections:
            log(f"training loop: trainer runs of {args.n1} and {args.n2} steps ({'cached and uncached' if flags['cache'] else 'uncached only: no --cache_embeddings in the trainer'})")
            loop = measure_loop(paths, args, flags, scratch, between=bench_floor.block if bench_floor else None)
        if bench_floor:
            floor = bench_floor.result()
            del bench_floor
            gc.collect()
        breakdown = None
        if "breakdown" in sections:
            log("loop breakdown (the trainer's main() in a subprocess, with timers)")
            breakdown = measure_breakdown(paths, args, flags, scratch)
        cache_build = None
        if "cache" in sections:
            log("building the embedding cache, one image per call and batched")
            cache_build = measure_cache_build(paths, args)
        if "memory" in sections:
            log("peak memory (subprocesses)")
            memory = measure_memory(args)
        if "latency" in sections:
            log("forward latency")
            latency = measure_latency(SCALED_PRIOR, "cpu", torch.float32, CPU_BATCH, CPU_RES // 32, CPU_RANK, args.latency_repeats)
        if "flops" in sections:
            extra = extra_flops(paths)
        print_cpu_results(args, flags, loop, floor, memory, latency, extra, breakdown, cache_build)
        if "params" in sections:
            print_params()
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s; load average at end {loadavg():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
