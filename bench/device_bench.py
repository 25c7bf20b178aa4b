"""GPU figures of the real trainer: `bench/benchmark.py --device cuda` (or `--smoke_device_path`).

Builds a real-size random prior repo (c 1536, depth 32: 994 M parameters) and CLIP text encoder,
a real-size EfficientNet and a set of JPEGs, then:
  * times the bare floor in this process: the trainer's own LoRA prior (add_lora, its dtype
    choices), compute_loss, clipping and fused AdamW on one fixed batch, nothing else; bf16 and
    fp16 (with GradScaler);
  * runs train_wuerstchen_prior_lora.py itself once per mode (eager bf16 and fp16, each compile
    mode, gradient checkpointing at several fractions) and reads the s/step it measured between
    loss reads and its peak GPU memory from training_info.json;
  * counts the executed FLOPs of one step (FlopCounterMode) for MFU, and the ops one forward
    dispatches under CUDA autocast before and after the trainer's dtype fixes (tools/op_count).
Writes `results.json` and `results.md` to --out. `--smoke_device_path` runs the same code on the
CPU with tiny sizes (a check of the code path, not a figure); a test runs it.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train_wuerstchen_prior_lora.py"

# What each trainer run adds to the common flags; `floor` names the bare step it is judged against.
MODES = {
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
DEFAULT_MODES = "eager bf16,eager fp16,compile default,compile reduce-overhead,checkpointing 1,checkpointing 0.5,checkpointing 0.25"

# Sizes: the GPU setting, and tiny ones for the CPU smoke run.
DEVICE = {"prior": "real", "text": "real", "images": 32, "image_size": (832, 768), "resolution": 768, "batch": 8, "rank": 8, "steps": 60, "logging": 5}
SMOKE = {"prior": {"c_in": 16, "c": 32, "c_cond": 32, "c_r": 8, "depth": 2, "nhead": 2, "dropout": 0.1},
         "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
         "images": 8, "image_size": (80, 64), "resolution": 64, "batch": 2, "rank": 4, "steps": 6, "logging": 2}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(workdir, sizes, device):
    """Prior repo, EfficientNet and images under `workdir` (reused when complete)."""
    from benchmark import REAL_PRIOR, REAL_TEXT, build_prior

    from tools.make_tiny_models import make_image_dataset, make_image_encoder, make_prior_repo

    stamp = workdir / "built.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    cfg = REAL_PRIOR if sizes["prior"] == "real" else sizes["prior"]
    prior = build_prior(cfg, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    paths = {
        "prior": make_prior_repo(workdir / "prior_repo", prior=prior, text_encoder=REAL_TEXT if sizes["text"] == "real" else sizes["text"]),
        "image_encoder": make_image_encoder(workdir / "effnet.safetensors"),
        "dataset": make_image_dataset(workdir / "data", "imagefolder_jsonl", n=sizes["images"], size=sizes["image_size"]),
        "config": cfg,
    }
    del prior
    stamp.write_text(json.dumps(paths))
    log(f"built the models and {sizes['images']} images in {time.perf_counter() - t0:.0f} s")
    return paths


def floor(paths, sizes, device, precision, steps, warmup):
    """The bare LoRA step with the trainer's own pieces, on one fixed batch; s/step, peak memory and
    the executed FLOPs of one step."""
    from benchmark import counted_flops, lora_args

    import train_wuerstchen_prior_lora as T
    from wuerstchen_models import load_prior_components, use_sdpa_attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] if device.type == "cuda" else torch.float32
    prior, _, _, scheduler = load_prior_components(paths["prior"])
    prior.requires_grad_(False).to(device, dtype=dtype)
    use_sdpa_attention(prior)
    _, params, _ = T.add_lora(prior, lora_args(sizes["rank"]))
    if dtype == torch.bfloat16:
        T.norms_in_activation_dtype(prior, dtype)
    T.scheduler_to(scheduler, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(0)
    grid, batch = sizes["resolution"] // 32, sizes["batch"]
    emb = torch.randn(batch, 16, grid, grid, generator=g).to(device)
    text = torch.randn(batch, 77, prior.config.c_cond, generator=g).to(device, dtype)
    noise, t = torch.randn(emb.shape, generator=g).to(device), torch.rand(batch, generator=g).to(device)

    def forward_backward():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = T.compute_loss(prior, scheduler, emb, text, noise, t)
        scaler.scale(loss).backward()

    def step():
        forward_backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    flops = counted_flops(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    row = {"s_per_step": (time.perf_counter() - t0) / steps, "step_flops": flops}
    if device.type == "cuda":
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del prior, optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def trainer_run(paths, sizes, workdir, name, extra, env):
    """One run of the real trainer; its own timing (training_info.json "speed")."""
    out = workdir / "runs" / name.replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(TRAIN),
           "--pretrained_prior_model_name_or_path", paths["prior"], "--image_encoder", paths["image_encoder"],
           "--dataset", paths["dataset"], "--output_dir", str(out), "--embeddings_cache_dir", str(workdir / "cache"),
           "--resolution", str(sizes["resolution"]), "--train_batch_size", str(sizes["batch"]), "--rank", str(sizes["rank"]),
           "--center_crop", "--report_to", "none", "--checkpointing_steps", "0", "--validation_steps", "1000000",
           "--max_train_steps", str(sizes["steps"]), "--logging_steps", str(sizes["logging"]), *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=1800)
    row = {"wall_s": time.perf_counter() - t0, "flags": " ".join(extra)}
    warnings = [line for line in proc.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    if warnings:
        row["messages"] = warnings
    if proc.returncode != 0:
        row["error"] = (warnings or proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    speed = json.loads((out / "training_info.json").read_text())["speed"]
    row.update(speed)
    shutil.rmtree(out, ignore_errors=True)
    return row


def matmul_rate(device):
    """The card's bf16 matrix-multiply rate (TFLOP/s): the physical limit MFU is read against."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def op_counts(cfg, sizes):
    from tools.op_count import lora_step_ops

    grid = sizes["resolution"] // 32
    out = {}
    for name, optimized in (("before", False), ("trainer", True)):
        ops, copied = lora_step_ops(cfg, optimized, sizes["batch"], grid, sizes["rank"], with_copy_bytes=True)
        out[name] = {"ops": sum(ops.values()), "dtype_copies": ops["aten._to_copy.default"], "dtype_copy_gib": copied / 2**30}
    return out


def table(results):
    rows = ["| mode | s/step | images/s | peak GPU memory | trainer / floor | MFU (executed FLOPs) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    batch, flops = results["sizes"]["batch"], results["floors"]["bf16"]["step_flops"]
    peak = results["peak_tflops"] * 1e12

    def line(name, r, vs=None):
        if "error" in r:
            return f"| {name} | failed: {r['error']} | | | | |"
        s = r["s_per_step"]
        mem = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r.get("peak_gpu_memory_gib") is not None else "n/a"
        ratio = f"{s / vs:.3f}x" if vs else ""
        return f"| {name} | {s:.4f} | {batch / s:.1f} | {mem} | {ratio} | {100 * flops / s / peak:.1f} % |"

    for precision, r in results["floors"].items():
        rows.append(line(f"bare floor {precision}", r))
    for name, r in results["runs"].items():
        rows.append(line(name, r, results["floors"][MODES[name][1]]["s_per_step"]))
    ops = results["op_counts"]
    rows.append("")
    rows.append(f"One forward under CUDA autocast dispatches {ops['before']['ops']} ops with {ops['before']['dtype_copies']} dtype copies "
                f"({ops['before']['dtype_copy_gib']:.2f} GiB) before the trainer's dtype fixes, {ops['trainer']['ops']} ops with "
                f"{ops['trainer']['dtype_copies']} ({ops['trainer']['dtype_copy_gib']:.2f} GiB) now (tools/op_count.py).")
    rows.append(f"Executed FLOPs per step {flops / 1e12:.2f} TFLOP; MFU against {results['peak_tflops']:g} TFLOP/s"
                + (f"; measured bf16 matmul rate {results['matmul_tflops']:.0f} TFLOP/s" if results.get("matmul_tflops") else "") + ".")
    return "\n".join(rows) + "\n"


def run(args):
    smoke = args.smoke_device_path
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    sizes = dict(SMOKE if smoke else DEVICE)
    if args.steps:
        sizes["steps"] = args.steps
    modes = [m.strip() for m in (args.modes or ("eager bf16,compile default,checkpointing 0.5" if smoke else DEFAULT_MODES)).split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: --modes: unknown {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    out = Path(args.out or (ROOT / "bench" / ("smoke_results" if smoke else "device_results")))
    workdir = Path(args.workdir or out / "work")
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    paths = build(workdir, sizes, device)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: not a figure)", "torch": torch.__version__,
               "sizes": sizes, "peak_tflops": args.peak_tflops, "matmul_tflops": matmul_rate(device), "floors": {}, "runs": {}}
    for precision in ("bf16", "fp16"):
        log(f"bare floor {precision}")
        results["floors"][precision] = floor(paths, sizes, device, precision, steps=3 if smoke else 20, warmup=1 if smoke else 5)
    for name in modes:
        log(f"trainer: {name}")
        extra = list(MODES[name][0])
        backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
        if backend != "inductor" and "--torch_compile" in extra:
            extra += ["--torch_compile_backend", backend]
        results["runs"][name] = trainer_run(paths, sizes, workdir, name, extra, env)
    results["op_counts"] = op_counts(paths["config"], sizes)
    results["total_s"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "results.md").write_text(text)
    print(text)
    log(f"wrote {out / 'results.json'} and results.md in {results['total_s']:.0f} s")
    return 0
