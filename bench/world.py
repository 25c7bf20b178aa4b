"""A small synthetic world that a Wuerstchen prior can really learn, built offline in about a minute.

Pictures of six classes (a coloured shape each, named in the caption) go through the real
EfficientNet encoder layout (tiny random weights, calibrated: `tools/make_tiny_models.py`). A small
`WuerstchenPrior` is pretrained from scratch on their embeddings by a plain loop written here, on
purpose independent of the trainer's code: `scheduler.add_noise`, t ~ U(0, 1), epsilon MSE, the
`(effnet + 1) / 42` scaling, 10 % empty captions for guidance. If the trainer's objective drifts from
this reference, a LoRA it trains stops matching what the sampler expects, and the learning test sees it.

A seventh class, the new concept, is never shown in pretraining: a magenta star called "zorb". A
nearest-centroid classifier over real embeddings (in the space the pipeline outputs, `emb * 42 - 1`)
says which class a generated embedding belongs to. `concept accuracy` is the share of embeddings
generated for the new prompt that land nearest the new class; `old accuracy` the same for the six
pretrained prompts (drift, when a LoRA is attached).

    python -m bench.world build OUT [--quick]     # build the world under OUT
    python -m bench.world score OUT [--lora DIR]  # concept and old-prompt accuracy, base or with a LoRA
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/world.py` as well as `python -m bench.world`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESOLUTION = 96  # training size: a 3x3 grid (EfficientNet stride 32) ...
OUTPUT_SIZE = 128  # ... which the prior pipeline makes for 128 px output (ceil(128 / 42.67) = 3)
BASE_CLASSES = {  # caption -> (RGB, shape)
    "a red circle": ((230, 30, 30), "circle"),
    "a blue square": ((30, 60, 230), "square"),
    "a green triangle": ((30, 200, 60), "triangle"),
    "a yellow square": ((240, 220, 30), "square"),
    "a white triangle": ((245, 245, 245), "triangle"),
    "a cyan circle": ((30, 220, 230), "circle"),
}
CONCEPT = "a zorb"  # the new word, never seen in pretraining ...
CONCEPT_LOOK = ((230, 40, 220), "star")  # ... for a new colour and a new shape
PRESERVE_PROMPT = "a cyan circle"  # the class prompt of the prior-preservation runs: the old prompt a zorb LoRA drifts most
PRIOR_CONFIG = dict(c_in=16, c=64, c_cond=32, c_r=32, depth=2, nhead=4, dropout=0.1)
TEXT_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WORLD_VERSION = 1  # bump when anything above changes: a cached world is rebuilt


def draw(color, shape, rng, size=RESOLUTION):
    """One picture: a shape of the class colour near the centre (a little jitter in place, size, turn
    and colour) on a dark, noisy ground."""
    ground = rng.uniform(20, 50)
    arr = np.clip(rng.normal(ground, 8, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.30, 0.40)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, size=2) * size
    turn = rng.uniform(-0.3, 0.3) - math.pi / 2
    col = tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in color)
    corners = {"square": 4, "triangle": 3, "star": 10}
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        k = corners[shape]
        radius = [r if (shape != "star" or j % 2 == 0) else r * 0.45 for j in range(k)]
        start = turn + (math.pi / 4 if shape == "square" else 0)
        d.polygon([(cx + radius[j] * math.cos(start + 2 * math.pi * j / k), cy + radius[j] * math.sin(start + 2 * math.pi * j / k)) for j in range(k)], fill=col)
    return img


def write_folder(folder, caption, look, n, seed):
    """n pictures of one class as an imagefolder with metadata.jsonl (what both trainers read)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            name = f"{i:03d}.png"
            draw(*look, rng).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return str(folder)


def pixels(images):
    """Pictures as the trainer feeds EfficientNet: RGB in [0, 1], ImageNet-normalised."""
    from wuerstchen_lora.models import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def effnet_features(encoder, images, batch=64):
    """Raw EfficientNet output (the space the prior pipeline returns), [N, 16, 3, 3]."""
    return torch.cat([encoder(pixels(images[i : i + batch])) for i in range(0, len(images), batch)])


FEATURE_MEAN, FEATURE_STD = 20.0, 10.0  # per channel, raw EfficientNet output: (x + 1) / 42 then spans about 0..1


@torch.no_grad()
def calibrate_encoder(path, images):
    """Rescale the encoder's last BatchNorm so that its output has FEATURE_MEAN / FEATURE_STD per channel
    on these pictures, and rewrite the file.

    The random encoder's output is O(1); the `(x + 1) / 42` scaling of the real model expects features
    spread over tens (it maps them to about 0..1). At O(1) the prior's inputs would carry a signal of
    std 0.02 under unit noise, which a small prior cannot learn from in a few hundred steps.
    """
    from safetensors.torch import load_file, save_file

    from wuerstchen_lora.models import load_image_encoder

    feats = effnet_features(load_image_encoder(path), images)
    mean, std = feats.mean((0, 2, 3)), feats.std((0, 2, 3))
    state = load_file(path)
    gain = FEATURE_STD / std
    state["mapper.1.weight"] = state["mapper.1.weight"] * gain
    state["mapper.1.bias"] = (state["mapper.1.bias"] - mean) * gain + FEATURE_MEAN
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def class_images(look, n, seed):
    rng = np.random.default_rng(seed)
    return [draw(*look, rng) for _ in range(n)]


@torch.no_grad()
def text_states(text_encoder, tokenizer, captions):
    tok = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state


def pretrain(prior, scheduler, latents, labels, texts, steps, batch=64, lr=1e-3, seed=0, drop=0.1):
    """Full-parameter pretraining of the prior, the references' objective written out by hand.

    latents [N, 16, h, w] are already (effnet + 1) / 42; texts [classes + 1, 77, c_cond], the last
    row the empty caption (used for a `drop` share of samples, as classifier-free guidance needs).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    prior.train()
    empty = texts.shape[0] - 1
    for _ in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch,), generator=g)
        x0 = latents[idx]
        cond = torch.where(torch.rand(batch, generator=g) < drop, torch.full((batch,), empty), labels[idx])
        t = torch.rand(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(prior(noisy, t, texts[cond]), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        sched.step()
    return prior.eval()


class Classifier:
    """Nearest centroid over real EfficientNet embeddings, one centroid per class (concept last)."""

    def __init__(self, centroids, names):
        self.centroids, self.names = centroids, list(names)

    def predict(self, embeddings):
        flat = embeddings.float().flatten(1)
        return torch.cdist(flat, self.centroids.flatten(1)).argmin(1)

    def accuracy(self, embeddings, name):
        return float((self.predict(embeddings) == self.names.index(name)).float().mean())

    def save(self, path):
        from safetensors.torch import save_file

        save_file({"centroids": self.centroids.contiguous()}, str(path), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls(f.get_tensor("centroids"), json.loads(f.metadata()["names"]))


def build_world(root, seed=0, pretrain_steps=1500, per_class=48, concept_images=16, centroid_images=32, batch=64, decoder=True, classes=None, lr=1e-3, log=print):
    """Write the world under `root` (reused when complete) and return its paths as a dict:

    prior_repo (laid out like warp-ai/wuerstchen-prior), decoder_repo (tiny, random: images are not
    judged), image_encoder, concept_data (the new concept's training folder, `concept_images`
    pictures), and classifier (the centroids). `classes`: only the first that many of BASE_CLASSES (a
    quicker world for the test suite).
    """
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel

    from tools.make_tiny_models import build_tokenizer, make_decoder_repo, make_image_encoder, make_prior_repo
    from wuerstchen_lora.models import WuerstchenPrior, load_image_encoder

    root = Path(root)
    paths = {k: str(root / v) for k, v in dict(prior_repo="prior_repo", decoder_repo="decoder_repo", image_encoder="effnet.safetensors",
                                                concept_data="concept_data", classifier="classifier.safetensors").items()}
    stamp = root / "world.json"
    key = {"version": WORLD_VERSION, "seed": seed, "pretrain_steps": pretrain_steps, "per_class": per_class,
           "concept_images": concept_images, "centroid_images": centroid_images, "batch": batch, "decoder": decoder, "classes": classes, "lr": lr}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())["paths"]
    root.mkdir(parents=True, exist_ok=True)
    old = dict(list(BASE_CLASSES.items())[:classes])
    names = list(old) + [CONCEPT]
    looks = list(old.values()) + [CONCEPT_LOOK]
    make_image_encoder(paths["image_encoder"], seed=seed)
    calibrate_encoder(paths["image_encoder"], [im for k, look in enumerate(looks) for im in class_images(look, 8, seed * 1000 + 300 + k)])
    encoder = load_image_encoder(paths["image_encoder"])
    torch.manual_seed(seed)
    prior = WuerstchenPrior(**PRIOR_CONFIG)
    with torch.no_grad():  # the output is (x - a) / |1 - b|: start from small a, b (a b near 1 explodes)
        prior.out[1].weight.normal_(0.0, 0.02)
        prior.out[1].bias.zero_()
    make_prior_repo(paths["prior_repo"], seed=seed, prior=prior, text_encoder=TEXT_ENCODER)  # the text encoder and tokenizer
    text_encoder = CLIPTextModel.from_pretrained(paths["prior_repo"], subfolder="text_encoder").eval()
    tokenizer = build_tokenizer()
    scheduler = DDPMWuerstchenScheduler.from_pretrained(paths["prior_repo"], subfolder="scheduler")

    train_feats, centroid_feats = [], []
    for k, look in enumerate(looks):
        train_feats.append(effnet_features(encoder, class_images(look, per_class, seed * 1000 + k)))
        centroid_feats.append(effnet_features(encoder, class_images(look, centroid_images, seed * 1000 + 500 + k)))
    classifier = Classifier(torch.stack([f.mean(0) for f in centroid_feats]), names)
    classifier.save(paths["classifier"])

    base = len(old)
    latents = (torch.cat(train_feats[:base]) + 1.0) / 42.0  # REFERENCE: (effnet + 1) / 42
    labels = torch.arange(base).repeat_interleave(per_class)
    texts = text_states(text_encoder, tokenizer, list(old) + [""])
    log(f"world: pretraining a {sum(p.numel() for p in prior.parameters()) / 1e3:.0f} k-parameter prior for {pretrain_steps} steps "
        f"on {len(labels)} embeddings of {base} classes")
    pretrain(prior, scheduler, latents, labels, texts, pretrain_steps, batch=batch, lr=lr, seed=seed)
    prior.save_pretrained(os.path.join(paths["prior_repo"], "prior"))

    write_folder(paths["concept_data"], CONCEPT, CONCEPT_LOOK, concept_images, seed * 1000 + 900)
    if decoder:
        make_decoder_repo(paths["decoder_repo"], seed=seed)
    else:
        del paths["decoder_repo"]
    stamp.write_text(json.dumps({"key": key, "paths": paths}, indent=2))
    return paths


# ----------------------------------------------------------------------------------------------
# Measuring: generate with the pipeline and its own defaults, classify


def prior_pipeline(prior_repo, lora_path=None, via="diffusers", scale=1.0):
    """The prior pipeline of the world's base prior, with a LoRA file attached.

    via="diffusers": plain `load_lora_weights`, nothing of this project's loading code.
    via="infer": infer.py's own loader (`inference.load_prior_pipeline`, the function its main runs).
    scale: the LoRA's strength on top of what the file's header says (plain diffusers only).
    """
    import types

    from wuerstchen_lora import inference
    from wuerstchen_lora.models import build_prior_pipeline, load_prior_components

    if lora_path is not None and via == "infer":
        args = types.SimpleNamespace(prior_model=prior_repo, dtype="fp32", device="cpu", lora_scale=1.0, fuse_lora=False)
        return inference.load_prior_pipeline(args, lora_path)
    pipe = build_prior_pipeline(*load_prior_components(prior_repo))
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        folder, name = os.path.split(os.path.abspath(lora_path))
        pipe.load_lora_weights(folder, weight_name=name, adapter_name="judged")
        if scale != 1.0:  # e.g. the example's LoRA at the scale it was trained with (its file does not say)
            pipe.set_adapters(["judged"], adapter_weights=[scale])
    return pipe


@torch.no_grad()
def generate(pipe, prompt, n, seed=0):
    """n image embeddings for `prompt`: the pipeline's default Stage C timesteps and guidance 4.0."""
    from wuerstchen_lora.models import DEFAULT_STAGE_C_TIMESTEPS

    g = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, height=OUTPUT_SIZE, width=OUTPUT_SIZE, num_images_per_prompt=n, generator=g,
                timesteps=DEFAULT_STAGE_C_TIMESTEPS, guidance_scale=4.0, output_type="pt").image_embeddings


def evaluate(pipe, classifier, n=32, seed=0, old=True, per_prompt=False):
    """{"concept": accuracy on the new prompt, "old": mean accuracy on the six pretrained prompts,
    and with per_prompt each old prompt's accuracy}."""
    scores = {"concept": classifier.accuracy(generate(pipe, CONCEPT, n, seed), CONCEPT)}
    if old:
        each = {p: classifier.accuracy(generate(pipe, p, n, seed + 1 + k), p) for k, p in enumerate(classifier.names[:-1])}
        scores["old"] = float(np.mean(list(each.values())))
        if per_prompt:
            scores["per_prompt"] = each
    return scores


QUICK = dict(pretrain_steps=400, per_class=16, centroid_images=16, batch=64, lr=3e-3)  # the test's and the demo's world


@torch.no_grad()
def denoising_loss(pipe, prompt, image_encoder, n=64, draws=4, seed=4242):
    """The references' epsilon MSE of the pipeline's prior (LoRA and all) on `n` fresh pictures of the
    concept, `draws` noise and timestep draws each, written out here like `pretrain` (not the trainer's
    code). A LoRA trained with another timestep or embedding convention does not lower it."""
    x0 = ((effnet_features(image_encoder, class_images(CONCEPT_LOOK, n, seed)) + 1.0) / 42.0).repeat(draws, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    t, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
    text = text_states(pipe.text_encoder, pipe.tokenizer, [prompt] * x0.shape[0])
    pipe.prior.eval()
    return float(F.mse_loss(pipe.prior(pipe.scheduler.add_noise(x0, noise, t), t, text), noise))


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the synthetic world, or score a prior (with a LoRA) in it.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the world under OUT (reused when complete) and print the base prior's accuracy per prompt")
    b.add_argument("out")
    b.add_argument("--quick", action="store_true", help="the test suite's smaller world (about 45 s instead of 3 min on 2 cores)")
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="concept and old-prompt accuracy of the world's prior, with a LoRA (a file or training folder) if given")
    s.add_argument("world")
    s.add_argument("--lora", default=None)
    s.add_argument("--samples", type=int, default=32)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead, and thrash on a busy machine
    torch.set_flush_denormal(True)
    if a.command == "build":
        t0 = time.time()
        paths = build_world(a.out, a.seed, **(QUICK if a.quick else {}))
        print(f"world built in {time.time() - t0:.0f} s: {a.out}")
        return 0
    paths = json.loads((Path(a.world) / "world.json").read_text())["paths"]
    lora = a.lora
    if lora and os.path.isdir(lora):
        lora = os.path.join(lora, "pytorch_lora_weights.safetensors")
    scores = evaluate(prior_pipeline(paths["prior_repo"], lora, via="infer" if lora else "diffusers"), Classifier.load(paths["classifier"]), a.samples, per_prompt=True)
    what = f"with {a.lora}" if a.lora else "base prior"
    print(f"{what}: concept accuracy ({CONCEPT!r}) {scores['concept']:.2f}, old-prompt accuracy {scores['old']:.2f} "
          f"({', '.join(f'{k!r} {v:.2f}' for k, v in scores['per_prompt'].items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
