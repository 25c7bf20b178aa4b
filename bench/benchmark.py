#!/usr/bin/env python
"""Speed and memory figures for LoRA training of the Wuerstchen v2 prior (Stage C); see bench/README.md.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.benchmark --out /tmp/bench                 # CPU, scaled prior
    HF_HUB_OFFLINE=1 .venv/bin/python bench/benchmark.py --out /tmp/bench                  # the same
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.benchmark --out /tmp/bench --steps 24 --min_run_time 1  # short
    .venv/bin/python -m bench.benchmark --device cuda --out /tmp/gpu                       # real prior, one GPU
    .venv/bin/python -m bench.benchmark --smoke_device_path --out /tmp/smoke              # GPU code path, tiny, CPU

Every in-process figure comes from one function, `bare_step` (the trainer's own add_lora,
compute_loss, norms_in_activation_dtype, scheduler_to and fused AdamW on one fixed batch), timed
with torch.utils.benchmark. The real trainer runs in a subprocess and times itself (the "speed"
entry of its training_info.json). Writes results.json and results.md to --out.
"""

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/benchmark.py` as well as `python -m bench.benchmark`
    sys.path.insert(0, str(ROOT))
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("KINETO_LOG_LEVEL", "5")):
    os.environ.setdefault(_key, _value)  # KINETO_LOG_LEVEL: no profiler start/stop lines

import torch
from torch.utils.benchmark import Timer

TRAIN = ROOT / "train_wuerstchen_prior_lora.py"
REAL_PRIOR = {"c_in": 16, "c": 1536, "c_cond": 1280, "c_r": 64, "depth": 32, "nhead": 24, "dropout": 0.1}
SCALED_PRIOR = {"c_in": 16, "c": 384, "c_cond": 64, "c_r": 64, "depth": 4, "nhead": 6, "dropout": 0.1}
REAL_TEXT = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120}
SCALED_TEXT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the trainer's default (--lora_targets attn)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {
    "cpu": {"prior": SCALED_PRIOR, "text": SCALED_TEXT, "images": 32, "image_size": (320, 256), "resolution": 256, "batch": 4, "rank": 4, "steps": 64, "logging": 8},
    "cuda": {"prior": REAL_PRIOR, "text": REAL_TEXT, "images": 32, "image_size": (832, 768), "resolution": 768, "batch": 8, "rank": 8, "steps": 60, "logging": 5},
    "smoke": {"prior": {"c_in": 16, "c": 32, "c_cond": 32, "c_r": 8, "depth": 2, "nhead": 2, "dropout": 0.1},
              "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
              "images": 8, "image_size": (80, 64), "resolution": 64, "batch": 2, "rank": 4, "steps": 6, "logging": 2},
}  # fmt: skip
# Trainer modes: the flags each run adds, and the precision of the bare floor it is compared with.
MODES = {
    "cached": (["--cache_embeddings"], "fp32"),
    "uncached": (["--no_cache_embeddings"], "fp32"),
    "eager bf16": (["--mixed_precision", "bf16"], "bf16"),
    "eager fp16": (["--mixed_precision", "fp16"], "fp16"),
    "compile default": (["--mixed_precision", "bf16", "--torch_compile"], "bf16"),
    "compile reduce-overhead": (["--mixed_precision", "bf16", "--torch_compile", "reduce-overhead"], "bf16"),
    "compile max-autotune": (["--mixed_precision", "bf16", "--torch_compile", "max-autotune"], "bf16"),
    "checkpointing 1": (["--mixed_precision", "bf16", "--gradient_checkpointing"], "bf16"),
    "checkpointing 0.5": (["--mixed_precision", "bf16", "--gradient_checkpointing", "0.5"], "bf16"),
    "checkpointing 0.25": (["--mixed_precision", "bf16", "--gradient_checkpointing", "0.25"], "bf16"),
    "compile + checkpointing 0.5": (["--mixed_precision", "bf16", "--torch_compile", "--gradient_checkpointing", "0.5"], "bf16"),
}
DEFAULT_MODES = {"cpu": "cached,uncached", "cuda": "eager bf16,eager fp16,compile default,compile reduce-overhead,checkpointing 1,checkpointing 0.5,checkpointing 0.25",
                 "smoke": "eager bf16,compile default,checkpointing 0.5"}
SECTIONS = {"cpu": "floor,trainer,cache,memory,latency,params,flops", "cuda": "floor,trainer,ops", "smoke": "floor,trainer,ops"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    return float(Path("/proc/loadavg").read_text().split()[0])


def build_prior(cfg, device="cpu", seed=0):
    """A random prior like tools/make_tiny_models' (no all-zero parameters, a small output layer),
    so that it behaves like a trained one: finite loss, non-zero gradients, every layer dense."""
    from wuerstchen_lora.models import WuerstchenPrior

    torch.manual_seed(seed)
    with torch.device(device):
        prior = WuerstchenPrior(**cfg)
    if torch.device(device).type != "meta":
        with torch.no_grad():
            for p in prior.parameters():
                if p.numel() and not torch.any(p):
                    p.normal_(0.0, 0.02)
            prior.out[1].weight.normal_(0.0, 0.02)
            prior.out[1].bias.zero_()
    return prior


@dataclass(frozen=True)
class BareStep:
    """What bare_step builds: `step()` runs one training step; the rest is for the memory figures."""

    step: Callable[[], None]
    prior: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    inputs: tuple  # (embeddings, noise, timesteps, text)


def bare_step(cfg, device, precision, rank, batch, grid, kind="lora", checkpointing=False, seed=0):
    """The bare floor: one training step with the trainer's own pieces on one fixed batch (embeddings,
    text, noise, timesteps), nothing else: no data, encoders, clipping or logging.

    kind "lora" is the trainer's setup (frozen prior in `precision`, fp32 LoRA from add_lora, bf16
    norms in bf16); kind "full" trains every weight (fp32 master weights under autocast), for memory."""
    from diffusers import DDPMWuerstchenScheduler

    from wuerstchen_lora import flags as F
    from wuerstchen_lora import objective
    from wuerstchen_lora import recipe as T
    from wuerstchen_lora.models import use_sdpa_attention

    device, dtype = torch.device(device), DTYPES[precision]
    prior = build_prior(cfg, device, seed)
    use_sdpa_attention(prior)
    if kind == "lora":
        prior.requires_grad_(False).to(dtype=dtype)
        argv = ["--dataset", "unused", "--rank", str(rank), "--lora_alpha", str(rank)] + ["--gradient_checkpointing"] * checkpointing
        cfg_ = F.parse_args(argv)
        _, params, _ = T.add_lora(prior, cfg_.lora, cfg_.optim)
        if dtype == torch.bfloat16:
            T.norms_in_activation_dtype(prior, dtype)
    else:
        params = list(prior.parameters())
        if checkpointing:
            T.checkpoint_blocks(prior, 1.0)
        prior.train()
    scheduler = objective.scheduler_to(DDPMWuerstchenScheduler(), device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(seed + 1)
    emb, noise = (torch.randn(batch, cfg["c_in"], grid, grid, generator=g).to(device) for _ in range(2))
    t = torch.rand(batch, generator=g).to(device)
    text = torch.randn(batch, 77, cfg["c_cond"], generator=g).to(device, dtype if kind == "lora" else torch.float32)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = objective.compute_loss(prior, scheduler, emb, text, noise, t)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return BareStep(step=step, prior=prior, params=list(params), optimizer=optimizer, inputs=(emb, noise, t, text))


def time_it(fn, min_run_time):
    """torch.utils.benchmark: blocks of calls for at least `min_run_time` s (CUDA synchronised)."""
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    return {"s": m.median, "iqr": m.iqr, "runs": len(m.times)}


def count_flops(fn):
    """Executed matmul/conv/attention FLOPs (FlopCounterMode). CPU SDPA is not counted: the CPU
    figures are counted on the meta device, where attention decomposes into counted bmm."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Figures


def measure_floor(sizes, device, precision, min_run_time):
    b = bare_step(sizes["prior"], device, precision, sizes["rank"], sizes["batch"], sizes["resolution"] // 32)
    b.step()  # AdamW state
    flops = count_flops(b.step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_it(b.step, min_run_time)
    row = {"s_per_step": t["s"], "iqr": t["iqr"], "runs": t["runs"], "step_flops": flops}
    if device.type == "cuda":
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del b
    free(device)
    return row


def trainer_run(paths, sizes, workdir, name, extra, env):
    """One run of the real trainer in a subprocess; returns the "speed" it wrote to training_info.json."""
    out = workdir / "runs" / name.replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(TRAIN),
           "--pretrained_prior_model_name_or_path", paths["prior"], "--image_encoder", paths["image_encoder"],
           "--dataset", paths["dataset"], "--output_dir", str(out), "--embeddings_cache_dir", str(workdir / "cache"),
           "--resolution", str(sizes["resolution"]), "--train_batch_size", str(sizes["batch"]), "--rank", str(sizes["rank"]),
           "--center_crop", "--report_to", "none", "--checkpointing_steps", "0",
           "--max_train_steps", str(sizes["steps"]), "--logging_steps", str(sizes["logging"]), *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=3600)
    messages = [line for line in proc.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    row = {"flags": " ".join(extra), "wall_s": time.perf_counter() - t0, "messages": messages}
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        row["error"] = (messages or proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    row.update(json.loads((out / "training_info.json").read_text())["speed"])
    shutil.rmtree(out, ignore_errors=True)
    return row


def measure_cache_build(paths, sizes, min_run_time):
    """s/image of the trainer's build_cache over the benchmark images, --cache_batch_size 1 and 8."""
    from accelerate import Accelerator

    from wuerstchen_lora import flags as F
    from wuerstchen_lora import recipe as T
    from wuerstchen_lora.cache import build_cache
    from wuerstchen_lora.data import load_training_dataset
    from wuerstchen_lora.models import load_image_encoder, load_prior_components

    _, text_encoder, tokenizer, _ = load_prior_components(paths["prior"])
    accelerator = Accelerator(cpu=True)
    encoders = T.Encoders(load_image_encoder(paths["image_encoder"]).eval(), text_encoder, tokenizer, accelerator.device, torch.float32)
    dataset, image_column, caption_column = load_training_dataset(paths["dataset"])
    out = {}
    with tempfile.TemporaryDirectory(prefix="cache-build-") as tmp, torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        for batch in (1, 8):
            args = F.parse_args(["--dataset", paths["dataset"], "--resolution", str(sizes["resolution"]), "--center_crop", "--cache_batch_size", str(batch)])
            build = lambda: build_cache(tempfile.mkdtemp(dir=tmp), dataset, (image_column, caption_column), args.data, args.cache,  # noqa: E731
                                        encoders.image, encoders.text, accelerator)  # noqa: E731 (a fresh folder each call)
            out[str(batch)] = time_it(build, min_run_time)["s"] / len(dataset)
    return out


def peak_live_bytes(fn):
    """(peak, end): the most CPU tensor bytes live at once while fn() ran, above those live before,
    and the bytes still live at the end, summed from the profiler's allocation events in time order
    (the CPU twin of torch.cuda.max_memory_allocated, which PyTorch does not keep for the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak, live


def measure_memory(sizes, steps=3):
    """Peak live tensor bytes of `steps` bare steps from a fresh optimiser, LoRA and full fine-tuning."""
    out = {}
    for precision, checkpointing in (("bf16", False), ("fp32", False), ("bf16", True)):
        for kind in ("lora", "full"):
            b = bare_step(sizes["prior"], "cpu", precision, sizes["rank"], sizes["batch"], sizes["resolution"] // 32, kind, checkpointing)
            gc.collect()
            start = nbytes(b.prior.parameters()) + nbytes(b.prior.buffers()) + nbytes(b.inputs)
            peak, end = peak_live_bytes(lambda: [b.step() for _ in range(steps)])
            state = nbytes(v for s in b.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
            if abs(end - state) > 2**20:  # what outlives the steps is the AdamW state, or events were missed
                raise RuntimeError(f"memory {kind} {precision}: {end} bytes live after the steps, AdamW state {state}")
            key = f"{kind} {precision}" + (" checkpointing" if checkpointing else "")
            out[key] = {"trainable": sum(p.numel() for p in b.params), "weights_bytes": nbytes(b.prior.parameters()), "added_bytes": peak,
                        "total_bytes": start + peak, "optimizer_state_bytes": state}
            log(f"  memory {key}: {peak / 2**20:.1f} MiB added, {(start + peak) / 2**20:.1f} MiB in all")
            del b
            gc.collect()
    return out


@torch.no_grad()
def measure_latency(sizes, min_run_time, rounds=30):
    """Forward latency of the base prior, with an unmerged LoRA (peft) and with it fused (fuse_lora +
    unload_lora, what infer.py --fuse_lora does); eval, no_grad; `rounds` rounds of one measurement each."""
    from peft import LoraConfig

    from wuerstchen_lora.models import use_sdpa_attention

    cfg, batch, grid = sizes["prior"], sizes["batch"], sizes["resolution"] // 32
    base = build_prior(cfg).eval()
    use_sdpa_attention(base)
    lora = copy.deepcopy(base)
    lora.add_adapter(LoraConfig(r=sizes["rank"], lora_alpha=sizes["rank"], init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.01)  # not the zero init: the LoRA must change the output
    fused = copy.deepcopy(lora)
    fused.fuse_lora()
    fused.unload_lora()
    models = {"base": base, "unmerged LoRA": lora, "fused LoRA": fused}
    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(batch, cfg["c_in"], grid, grid, generator=g), torch.randn(batch, 77, cfg["c_cond"], generator=g), torch.full((batch,), 0.5)
    y = {k: m(x, t, text) for k, m in models.items()}
    check = {"lora_vs_base": ((y["unmerged LoRA"] - y["base"]).norm() / y["base"].norm()).item(),
             "fused_vs_unmerged": ((y["fused LoRA"] - y["unmerged LoRA"]).norm() / y["unmerged LoRA"].norm()).item()}
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(time_it(lambda m=m: m(x, t, text), min_run_time / rounds)["s"])
    over_base = {k: statistics.median(a / b for a, b in zip(v, times["base"])) for k, v in times.items()}  # per round: drift cancels
    return {"ms": {k: 1000 * statistics.median(v) for k, v in times.items()}, "over_base": over_base, "check": check}


def count_params(cfg, rank=None):
    """(trainable, total) on the meta device: nothing is allocated, even for the real prior."""
    from peft import LoraConfig

    prior = build_prior(cfg, "meta")
    if rank:
        prior.requires_grad_(False).add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return sum(p.numel() for p in prior.parameters() if p.requires_grad), sum(p.numel() for p in prior.parameters())


@torch.no_grad()
def forward_flops():
    """Forward FLOPs per sample of EfficientNetV2-S, the text encoder and the prior, at the CPU
    benchmark's scale (256 px) and the real one (768 px), counted on the meta device (shapes only)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from wuerstchen_lora.models import EfficientNetEncoder, use_sdpa_attention

    out = {}
    for name, prior_cfg, text_cfg, res in (("scaled", SCALED_PRIOR, SCALED_TEXT, 256), ("real", REAL_PRIOR, REAL_TEXT, 768)):
        with torch.device("meta"):
            effnet = EfficientNetEncoder().eval()
            text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **text_cfg)).eval()
            prior = build_prior(prior_cfg, "meta").eval()
            use_sdpa_attention(prior)
            g = res // 32
            out[name] = {"effnet": count_flops(lambda: effnet(torch.zeros(1, 3, res, res))),
                         "text": count_flops(lambda: text(torch.zeros(1, 77, dtype=torch.long))),
                         "prior": count_flops(lambda: prior(torch.zeros(1, 16, g, g), torch.full((1,), 0.5), torch.zeros(1, 77, prior_cfg["c_cond"])))}
    return out


def matmul_tflops(min_run_time):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / time_it(lambda: a @ a, min_run_time)["s"] / 1e12


def op_counts(sizes):
    from tools.op_count import lora_step_ops

    out = {}
    for name, optimized in (("before", False), ("trainer", True)):
        ops, copied = lora_step_ops(sizes["prior"], optimized, sizes["batch"], sizes["resolution"] // 32, sizes["rank"], with_copy_bytes=True)
        out[name] = {"ops": sum(ops.values()), "dtype_copies": ops["aten._to_copy.default"], "dtype_copy_gib": copied / 2**30}
    return out


# ----------------------------------------------------------------------------------------------
# Output


def markdown(r):
    s = r["sizes"]
    lines = [f"# Wuerstchen prior LoRA benchmark: {r['device']}", "", f"command: `{r['command']}`", f"machine: {r['machine']}", f"software: {r['software']}",
             f"torch threads {r['threads']}; load average {r['load_average']['start']:.2f} at start, {r['load_average']['end']:.2f} at end; {r['total_s']:.0f} s",
             f"prior {s['prior']}, {s['resolution']} px, batch {s['batch']}, LoRA rank {s['rank']}; trainer runs of {s['steps']} steps, losses read every {s['logging']}"]  # fmt: skip
    lines += ["", "| run | s/step | images/s | peak GPU memory | / floor | MFU |", "| --- | ---: | ---: | ---: | ---: | ---: |"] if r["floors"] or r["runs"] else []
    flops, peak = (r["floors"].get("bf16") or next(iter(r["floors"].values()), {})).get("step_flops"), r.get("peak_tflops")
    rows = [(f"bare floor {p}", f, None, f"median of {f['runs']}") for p, f in r["floors"].items()]
    rows += [(name, f, r["floors"].get(f.get("floor"), {}).get("s_per_step"), f"median of {f.get('windows')} windows") for name, f in r["runs"].items()]
    for name, f, floor_s, how in rows:
        if f.get("s_per_step") is None:
            lines.append(f"| {name} | failed: {f.get('error', 'no windows')} | | | | |")
            continue
        sps = f["s_per_step"]
        mem = f"{f['peak_gpu_memory_gib']:.2f} GiB" if f.get("peak_gpu_memory_gib") is not None else ""
        mfu = f"{100 * flops / sps / (peak * 1e12):.1f} %" if peak and flops else ""
        lines.append(f"| {name} | {sps:.4f} ({how}) | {s['batch'] / sps:.1f} | {mem} | {f'{sps / floor_s:.3f}x' if floor_s else ''} | {mfu} |")
    fig = []
    runs = r["runs"]
    if runs.get("cached", {}).get("s_per_step") and runs.get("uncached", {}).get("s_per_step"):
        fig.append(("trainer uncached / cached", f"{runs['uncached']['s_per_step'] / runs['cached']['s_per_step']:.2f}x"))
    if "cache" in r:
        fig.append(("building the cache, --cache_batch_size 1 / 8 (s/image)", f"{r['cache']['1']:.3f} / {r['cache']['8']:.3f}"))
    if "memory" in r:
        m = r["memory"]
        for label, key, field in (("peak memory LoRA / full, bf16 mixed precision, weights included", "bf16", "total_bytes"),
                                  ("same, fp32, weights included", "fp32", "total_bytes"), ("same, fp32, only what training adds", "fp32", "added_bytes"),
                                  ("same, bf16, both with gradient checkpointing", "bf16 checkpointing", "total_bytes")):  # fmt: skip
            lo, fu = m[f"lora {key}"][field], m[f"full {key}"][field]
            fig.append((label, f"{lo / fu:.3f} ({lo / 2**20:.1f} / {fu / 2**20:.1f} MiB)"))
    if "latency" in r:
        lat = r["latency"]
        fig.append(("prior forward, unmerged LoRA / base, fused LoRA / base (check: the LoRA moves the output, fusing keeps it)",
                    f"{lat['over_base']['unmerged LoRA']:.3f}x, {lat['over_base']['fused LoRA']:.3f}x (base {lat['ms']['base']:.1f} ms; {lat['check']['lora_vs_base']:.0e}, {lat['check']['fused_vs_unmerged']:.0e})"))
    if "params" in r:
        p = r["params"]
        fig.append(("trainable parameters, real prior, LoRA rank 4 / 8", " / ".join(f"{p[k][0]:,} ({100 * p[k][0] / p[k][1]:.3f} %)" for k in ("rank 4", "rank 8"))))
    if "flops" in r:
        for name, f in r["flops"].items():
            fig.append((f"forward GFLOP per sample, {name}: EfficientNet, text encoder, prior; encoders / LoRA prior step (2x forward)",
                        f"{f['effnet'] / 1e9:.2f}, {f['text'] / 1e9:.3f}, {f['prior'] / 1e9:.2f}; {(f['effnet'] + f['text']) / (2 * f['prior']):.2f}"))
    if "ops" in r:
        o = r["ops"]
        fig.append(("one forward under CUDA autocast: ops, dtype copies (GiB), before / with the trainer's dtype fixes",
                    " / ".join(f"{o[k]['ops']}, {o[k]['dtype_copies']} ({o[k]['dtype_copy_gib']:.2f})" for k in ("before", "trainer"))))
    if r.get("matmul_tflops"):
        fig.append(("measured bf16 matmul rate (8192^3), MFU's peak", f"{r['matmul_tflops']:.0f}, {peak:g} TFLOP/s"))
    if fig:
        lines += ["", "| figure | value |", "| --- | ---: |"] + [f"| {a} | {b} |" for a, b in fig]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: the scaled prior; cuda: the real prior on one GPU")
    p.add_argument("--smoke_device_path", action="store_true", help="the --device cuda code path on the CPU with tiny sizes (a check, no figures)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default: a folder under the temp dir)")
    p.add_argument("--workdir", default=None, help="models and images (reused when complete); default OUT/work")
    p.add_argument("--only", default=None, help="comma-separated sections: floor, trainer, cache, memory, latency, params, flops, ops (default: all of the device's)")
    p.add_argument("--modes", default=None, help=f"comma-separated trainer modes, of: {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=None, help="steps per trainer run (default: cpu 64, cuda 60, smoke 6)")
    p.add_argument("--logging_steps", type=int, default=None, help="the trainer's --logging_steps: its timing windows (default: cpu 8 = one epoch, cuda 5)")
    p.add_argument("--min_run_time", type=float, default=None, help="seconds per torch.utils.benchmark measurement (default: cpu 10, cuda 5, smoke 0.2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, and OMP/MKL threads of the CPU trainer runs (default 1: steady on a shared machine)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak for MFU (989: H100/H200 SXM)")
    p.add_argument("--compile_backend", default=None, help="torch.compile backend of the compile modes (default inductor; smoke aot_eager)")
    return p, p.parse_args(argv)


def main(argv=None):
    p, args = parse_args(argv)
    import diffusers
    import peft

    from wuerstchen_lora.models import quiet_library_logs

    quiet_library_logs()
    kind = "smoke" if args.smoke_device_path else args.device
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    torch.set_num_threads(args.threads)
    sizes = dict(SIZES[kind], steps=args.steps or SIZES[kind]["steps"], logging=args.logging_steps or SIZES[kind]["logging"])
    sections = set((args.only or SECTIONS[kind]).split(","))
    modes = (args.modes or DEFAULT_MODES[kind]).split(",")
    if sections - set(SECTIONS["cpu"].split(",") + ["ops"]) or set(modes) - set(MODES):
        p.error(f"unknown entries in --only {args.only} or --modes {args.modes}")
    min_run_time = args.min_run_time or {"cpu": 10.0, "cuda": 5.0, "smoke": 0.2}[kind]
    out = Path(args.out or Path(tempfile.gettempdir()) / f"wuerstchen-bench-{kind}")
    workdir = Path(args.workdir or out / "work")
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    r = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu{' (smoke: not a figure)' if kind == 'smoke' else ''}",
         "command": shlex.join(["python"] + sys.argv), "machine": f"{cpu}, {len(os.sched_getaffinity(0))} usable cores",
         "software": f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, python {platform.python_version()}",
         "threads": args.threads, "load_average": {"start": loadavg()}, "sizes": sizes, "floors": {}, "runs": {},
         "peak_tflops": args.peak_tflops if device.type == "cuda" else None}  # fmt: skip
    log(f"{r['command']}\n{r['machine']}; {r['software']}; load average {loadavg():.2f}")

    paths = build_models(workdir, sizes, device) if sections & {"trainer", "cache"} else None
    run_sections(r, args, kind, sections, sizes, device, modes, paths, workdir, min_run_time)
    r["load_average"]["end"], r["total_s"] = loadavg(), time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    text = markdown(r)
    (out / "results.md").write_text(text)
    print(text)
    log(f"wrote {out / 'results.json'} and results.md")
    return 0


def build_models(workdir, sizes, device):
    """A prior repo (prior + CLIP text encoder of `sizes`), EfficientNet and images; reused when complete."""
    from tools.make_tiny_models import (
        make_image_dataset,
        make_image_encoder,
        make_prior_repo,
    )

    stamp = workdir / "built.json"
    want = json.loads(json.dumps({k: sizes[k] for k in ("prior", "text", "images", "image_size")}))
    if stamp.is_file() and json.loads(stamp.read_text())["want"] == want:
        return json.loads(stamp.read_text())["paths"]
    log("building the models and images")
    prior = build_prior(sizes["prior"], device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    paths = {"prior": make_prior_repo(workdir / "prior_repo", prior=prior, text_encoder=sizes["text"]),
             "image_encoder": make_image_encoder(workdir / "effnet.safetensors"),
             "dataset": make_image_dataset(workdir / "data", "imagefolder_jsonl", n=sizes["images"], size=tuple(sizes["image_size"]))}
    del prior
    free(device)
    stamp.write_text(json.dumps({"want": want, "paths": paths}))
    return paths


def run_sections(r, args, kind, sections, sizes, device, modes, paths, workdir, min_run_time):
    """Fill the results `r` with each asked-for section."""
    if "floor" in sections:
        for precision in ("fp32",) if kind == "cpu" else ("bf16", "fp16"):
            log(f"bare floor {precision}")
            r["floors"][precision] = measure_floor(sizes, device, precision, min_run_time)
        if device.type == "cuda":
            r["matmul_tflops"] = matmul_tflops(min_run_time)
    if "trainer" in sections:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if device.type == "cpu":
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        backend = args.compile_backend or ("aot_eager" if kind == "smoke" else "inductor")
        for name in modes:
            extra = MODES[name][0] + (["--torch_compile_backend", backend] if backend != "inductor" and "--torch_compile" in MODES[name][0] else [])
            log(f"trainer: {name}")
            r["runs"][name] = dict(trainer_run(paths, sizes, workdir, name, extra, env), floor=MODES[name][1])
            log(f"  {r['runs'][name].get('s_per_step')} s/step, {r['runs'][name].get('windows')} windows, {r['runs'][name]['wall_s']:.0f} s in all")
    figures = {"cache": lambda: measure_cache_build(paths, sizes, min_run_time), "memory": lambda: measure_memory(sizes),
               "latency": lambda: measure_latency(sizes, min_run_time), "flops": forward_flops, "ops": lambda: op_counts(sizes),
               "params": lambda: {"full": count_params(REAL_PRIOR)[0], **{f"rank {k}": count_params(REAL_PRIOR, k) for k in (4, 8)}}}  # (trainable, total)
    for name in [name for name in figures if name in sections]:
        log(name)
        r[name] = figures[name]()


if __name__ == "__main__":
    sys.exit(main())
