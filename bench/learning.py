"""Does a trained LoRA learn? A quality benchmark on a synthetic world, side by side with the diffusers example.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.learning --out /tmp/learning \
        --example_dir PATH/TO/diffusers/examples/wuerstchen/text_to_image      # about 25 min on 2 cores

The world (bench/world.py) is a small prior pretrained here on six classes of coloured shapes. Each run
teaches it a seventh, "a zorb" (a magenta star, 16 pictures), and is judged by generation: the prior
pipeline with its own scheduler, the default Stage C timesteps and guidance 4.0 makes image
embeddings, and a nearest-centroid classifier over real embeddings says which class each one is.

- concept: share of embeddings for "a zorb" nearest the zorb centroid (the base prior: 0);
- old: the same on the six pretrained prompts with the LoRA attached (drift: lower is worse);
- curve: concept accuracy of the checkpoints at 1/4, 1/2, 3/4 and all of the steps.

Rows: the base prior; this trainer at its defaults; this trainer at the example's settings (rank,
learning rate, batch, steps, seed); the public example itself (`--example_dir`; run unchanged by
bench/run_example.py); and this trainer with prior preservation, EMA, DoRA and a warm start
(`--init_lora`: half the steps from the plain run's mid-point LoRA). Each LoRA is loaded by plain
diffusers `load_lora_weights`; the main row is generated through infer.py's loader as well and the
two are compared. Writes results.json and results.md to --out.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from bench import world as W  # noqa: E402

TRAIN = str(ROOT / "train_wuerstchen_prior_lora.py")
LORA = "pytorch_lora_weights.safetensors"
# The example builds LoraConfig(r=rank) without lora_alpha, so peft's default alpha 8 trains at scale
# 8 / rank; its file carries no alpha, and load_lora_weights then assumes alpha = rank (scale 1).
PEFT_DEFAULT_ALPHA = 8


def child_env(workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["HF_DATASETS_CACHE"] = str(Path(workdir) / "hf_datasets")  # the example's imagefolder cache, not ~/.cache
    return env


def run(cmd, env, log):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({proc.returncode}); see {log}")


def train_ours(world, out, seed, steps, flags, env):
    """This trainer as a user runs it; returns (LoRA files by step, seconds per step)."""
    shutil.rmtree(out, ignore_errors=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, TRAIN, "--pretrained_prior_model_name_or_path", world["prior_repo"],
           "--pretrained_decoder_model_name_or_path", world["decoder_repo"], "--image_encoder", world["image_encoder"],
           "--resolution", str(W.RESOLUTION), "--max_train_steps", str(steps), "--seed", str(seed),
           "--checkpointing_steps", str(steps // 4), "--report_to", "none", "--output_dir", str(out)] + flags
    if "--instance_data_dir" not in flags:
        cmd += ["--dataset", world["concept_data"]]
    run(cmd, env, f"{out}.log")
    info = json.loads((Path(out) / "training_info.json").read_text())
    files = {k * steps // 4: str(Path(out) / f"checkpoint-{k * steps // 4}" / LORA) for k in (1, 2, 3)}
    files[steps] = str(Path(out) / ("pytorch_lora_weights_ema.safetensors" if "--use_ema" in flags else LORA))
    return files, info["speed"]["s_per_step"]


def train_example(world, example_dir, out, seed, steps, rank, lr, batch, env):
    """The public diffusers example, unchanged (bench/run_example.py); returns (LoRA files by step, s/step)."""
    shutil.rmtree(out, ignore_errors=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    encoder_pt = Path(world["image_encoder"]).with_suffix(".pt")
    if not encoder_pt.exists():  # the Stage-B checkpoint's layout, which the example reads
        from safetensors.torch import load_file

        torch.save({"effnet_state_dict": load_file(world["image_encoder"])}, encoder_pt)
    log = Path(f"{out}.steps.json")
    env = dict(env, EXAMPLE_IMAGE_ENCODER=str(encoder_pt), EXAMPLE_LOG=str(log))
    cmd = [sys.executable, "-m", "bench.run_example", str(Path(example_dir) / "train_text_to_image_lora_prior.py"),
           "--pretrained_prior_model_name_or_path", world["prior_repo"], "--pretrained_decoder_model_name_or_path", world["decoder_repo"],
           "--train_data_dir", world["concept_data"], "--resolution", str(W.RESOLUTION), "--train_batch_size", str(batch),
           "--max_train_steps", str(steps), "--learning_rate", str(lr), "--rank", str(rank), "--seed", str(seed),
           "--checkpointing_steps", str(steps // 4), "--report_to", "tensorboard", "--output_dir", str(out)]
    run(cmd, env, f"{out}.log")
    record = json.loads(log.read_text())
    times = [t for _, t, _ in record]
    deltas = sorted(b - a for a, b in zip(times[len(times) // 10 :], times[len(times) // 10 + 1 :]))
    files = {k * steps // 4: str(Path(out) / f"checkpoint-{k * steps // 4}" / LORA) for k in (1, 2, 3)}
    files[steps] = str(Path(out) / LORA)
    return files, deltas[len(deltas) // 2]


def judge(world, classifier, files, samples, seed, scale=1.0):
    """Concept accuracy of every file; old-prompt accuracy (and per prompt) of the last one."""
    curve, last = {}, max(files)
    for step in sorted(files):
        pipe = W.prior_pipeline(world["prior_repo"], files[step], scale=scale)
        scores = W.evaluate(pipe, classifier, samples, seed, old=step == last, per_prompt=step == last)
        curve[step] = scores["concept"]
        if step == last:
            result = dict(scores)
    result["curve"] = curve
    return result


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results.json, results.md and the runs' folders go here")
    p.add_argument("--example_dir", default=None, help="diffusers' examples/wuerstchen/text_to_image (the example row is left out without it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=32, help="embeddings generated per prompt")
    p.add_argument("--example_rank", type=int, default=4, help="the example's rank (its default), also used for the 'example settings' row")
    p.add_argument("--example_lr", type=float, default=1e-3)
    p.add_argument("--pretrain_steps", type=int, default=1500, help="the world's pretraining (bench/world.py)")
    p.add_argument("--only", default=None, help="row names to run, separated by | (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t0 = time.time()
    world = W.build_world(out / "world", pretrain_steps=a.pretrain_steps)
    classifier = W.Classifier.load(world["classifier"])
    env = child_env(out)
    base = W.evaluate(W.prior_pipeline(world["prior_repo"]), classifier, a.samples, 0, per_prompt=True)
    print(f"base prior: {json.dumps(base)} ({time.time() - t0:.0f} s)", flush=True)

    b = ["--train_batch_size", str(a.batch)]
    ex = ["--rank", str(a.example_rank), "--learning_rate", str(a.example_lr)] + b
    rows = {
        "this trainer, defaults": b,
        "this trainer, example's settings": ex,
        "the diffusers example": None,
        "the diffusers example, at its training scale": "example-rescaled",
        "this trainer, example's settings + --lora_alpha 8": ["--lora_alpha", "8"] + ex,
        "+ prior preservation": ["--instance_data_dir", os.path.join(world["concept_data"]), "--instance_prompt", W.CONCEPT,
                                 "--with_prior_preservation", "--class_prompt", W.PRESERVE_PROMPT, "--num_class_images", "16"] + ex,
        "+ EMA": ["--use_ema"] + ex,
        "+ DoRA": ["--use_dora"] + ex,
        "+ warm start (--init_lora)": "init",
    }
    if a.only:
        rows = {k: v for k, v in rows.items() if k in a.only.split("|")}
    if a.example_dir is None:
        rows.pop("the diffusers example", None)
        rows.pop("the diffusers example, at its training scale", None)
    results = {name: [] for name in rows}

    def write(done):
        """results.json and results.md after every seed: an interrupted run keeps what it measured."""
        report = {"command": shlex.join([sys.executable, "-m", "bench.learning"] + (argv if argv is not None else sys.argv[1:])),
                  "seconds": round(time.time() - t0), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                  "settings": dict(vars(a), seeds=done), "base": base, "runs": results}
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "results.md").write_text(markdown(report))
        return report

    for i, seed in enumerate(a.seeds):
        for name, flags in rows.items():
            t = time.time()
            folder = out / "runs" / f"{name.replace(' ', '_').replace(',', '').replace('+', 'plus').replace(chr(39), '')}-seed{seed}"
            if flags == "example-rescaled":  # the same files, at the strength they were trained with
                prev = results["the diffusers example"][-1]
                files, sps = prev["files"], prev["s_per_step"]
                r = judge(world, classifier, {int(k): v for k, v in files.items()}, a.samples, seed, scale=PEFT_DEFAULT_ALPHA / a.example_rank)
                r.update(s_per_step=sps, files=files)
                results[name].append(r)
                print(f"seed {seed} {name}: concept {r['concept']:.2f} old {r['old']:.2f} curve {r['curve']}", flush=True)
                continue
            if flags is None:
                files, sps = train_example(world, a.example_dir, folder, seed, a.steps, a.example_rank, a.example_lr, a.batch, env)
            elif flags == "init":
                start = out / "runs" / f"this_trainer_example's_settings-seed{seed}".replace("'", "")
                half = a.steps // 2
                files, sps = train_ours(world, folder, seed, half, ["--init_lora", str(start / f"checkpoint-{half}" / LORA)] + ex, env)
                files = {half + k: v for k, v in files.items()}
            else:
                files, sps = train_ours(world, folder, seed, a.steps, flags, env)
            r = judge(world, classifier, files, a.samples, seed)
            r["s_per_step"], r["files"] = sps, files
            if name == "this trainer, example's settings":  # the same files through infer.py's own loader
                pipe = W.prior_pipeline(world["prior_repo"], files[a.steps], via="infer")
                r["infer_py"] = W.evaluate(pipe, classifier, a.samples, seed)
                ref = W.prior_pipeline(world["prior_repo"], files[a.steps])
                r["infer_py_max_diff"] = float((W.generate(pipe, W.CONCEPT, 4, 7) - W.generate(ref, W.CONCEPT, 4, 7)).abs().max())
            results[name].append(r)
            print(f"seed {seed} {name}: concept {r['concept']:.2f} old {r['old']:.2f} curve {r['curve']} "
                  f"{sps:.4f} s/step ({time.time() - t:.0f} s)", flush=True)
        report = write(a.seeds[: i + 1])
    print(markdown(report))
    return 0


def fmt(stat, digits=2):
    return "–" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def markdown(report):
    s = report["settings"]
    lines = [f"# Learning benchmark ({report['machine']}; CPU figures)", "",
             f"`{report['command']}`, {report['seconds'] / 60:.0f} min. Seeds {s['seeds']}, {s['steps']} steps, batch {s['batch']}, "
             f"{s['samples']} embeddings per prompt. Mean ± sd over seeds.", "",
             "| run | concept accuracy | old-prompt accuracy (drift) | " + " | ".join(f"step {k}/4" for k in (1, 2, 3)) + " | s/step (CPU) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| base prior, no LoRA | {report['base']['concept']:.2f} | {report['base']['old']:.2f} | | | | |"]
    for name, runs in report["runs"].items():
        if not runs:
            continue
        steps = sorted(runs[0]["curve"], key=int)
        curve = [fmt(mean_sd([r["curve"][k] for r in runs])) for k in steps[:-1]]
        curve = [""] * (3 - len(curve)) + curve
        lines.append(f"| {name} | {fmt(mean_sd([r['concept'] for r in runs]))} | {fmt(mean_sd([r['old'] for r in runs]))} | "
                     + " | ".join(curve) + f" | {fmt(mean_sd([r['s_per_step'] for r in runs]), 4)} |")
    main_runs = report["runs"].get("this trainer, example's settings") or []
    if main_runs and "infer_py" in main_runs[0]:
        lines += ["", f"Through infer.py's loader (same files): concept {fmt(mean_sd([r['infer_py']['concept'] for r in main_runs]))}, "
                  f"old {fmt(mean_sd([r['infer_py']['old'] for r in main_runs]))}; largest difference from plain diffusers "
                  f"`load_lora_weights` on the same seed: {max(r['infer_py_max_diff'] for r in main_runs):.2e}."]
    per = report["base"].get("per_prompt")
    if per:
        lines += ["", "Old-prompt accuracy per prompt, base prior and (first seed) each run:", "",
                  "| run | " + " | ".join(per) + " |", "| --- |" + " ---: |" * len(per),
                  "| base prior | " + " | ".join(f"{v:.2f}" for v in per.values()) + " |"]
        for name, runs in report["runs"].items():
            if runs and runs[0].get("per_prompt"):
                lines.append(f"| {name} | " + " | ".join(f"{runs[0]['per_prompt'][k]:.2f}" for k in per) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
