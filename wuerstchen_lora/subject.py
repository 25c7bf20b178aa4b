"""DreamBooth-style subject training: instance images with one prompt, and prior preservation.

Prior preservation trains, beside the subject's images, on examples of its class ("a photo of a
dog") so that the LoRA does not turn every dog into the subject. diffusers' DreamBooth scripts
render class *images* with the whole text-to-image model. The prior (Stage C) is trained on image
embeddings, so here the frozen base prior generates those embeddings directly: no decoder, no
EfficientNet, only the prior's sampling steps. Real class images (--class_data_dir) are encoded
like the cache encodes training images and used first.

Space of the generated embeddings: WuerstchenPriorPipeline ends with
`latents * latent_mean - latent_std` (42 and 1), i.e. it returns raw EfficientNet features
`effnet(x)`. The prior is trained on `(effnet(x) + 1) / 42` (objective.encode_images), so a pipeline
output maps back with `(out + latent_std) / latent_mean`: the exact inverse of its last line.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os

import torch

from wuerstchen_lora.data import _list_images, inspect_image, sample_noise, sample_plan
from wuerstchen_lora.models import (
    UserError,
    atomic_save_tensors,
    atomic_write_json,
    build_prior_pipeline,
)

CLASS_CACHE_FORMAT = 1
CLASS_FILE = "class_examples.safetensors"
CLASS_INFO = "class_examples.json"


# ----------------------------------------------------------------------------------------------
# Instance images


def instance_dataset(folder, prompt):
    """The subject's images, each captioned with `prompt` (any .txt files beside them are ignored).

    Returns (datasets.Dataset, "image", "text"), like data.load_training_dataset.
    """
    import datasets

    if not prompt or not prompt.strip():
        raise UserError("--instance_prompt is required with --instance_data_dir (e.g. \"a photo of sks dog\")")
    if not folder or not os.path.isdir(folder):
        raise UserError(f"--instance_data_dir {folder}: no such folder; give the folder of the subject's images")
    images = _list_images(folder)
    if not images:
        raise UserError(f"--instance_data_dir {folder}: no images found (looked for .jpg, .png, .webp and similar)")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, "text": [prompt.strip()] * len(images)}, features=features)
    return dataset, "image", "text"


# ----------------------------------------------------------------------------------------------
# Generated class embeddings


def pipeline_to_training_space(output, pipeline):
    """Undo the prior pipeline's final `latents * latent_mean - latent_std` (computed in fp32)."""
    return (output.float() + pipeline.config.latent_std) / pipeline.config.latent_mean


def pipeline_height_for_side(side, resolution_multiple):
    """A pipeline height/width whose latent grid, ceil(h / resolution_multiple), is exactly `side`.

    floor(side * m) / m lies in (side - 1, side] for m > 1, so its ceiling is side. 24 -> 1024.
    """
    height = math.floor(side * resolution_multiple)
    assert math.ceil(height / resolution_multiple) == side, (side, resolution_multiple, height)
    return height


def _generation_seed(seed, k):
    """Seed of generated class example k: one generator per example makes example k the same
    whatever the batch size, and keeps it apart from the training streams."""
    digest = hashlib.sha256(f"class-generation:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_base_prior(prior):
    if getattr(prior, "peft_config", None):
        raise RuntimeError("class embeddings must come from the base prior: generate them before attaching the LoRA")


@torch.no_grad()
def generate_class_embeddings(prior, text_encoder, tokenizer, scheduler, prompt, count, seed, side, device, dtype,
                              batch_size=4, steps=None, guidance_scale=4.0):
    """`count` image embeddings for `prompt` from the frozen base prior, in the training space of
    objective.encode_images: float32 [count, C, side, side] on the CPU, deterministic for a seed.

    The models run on `device` in `dtype` (where load_frozen_models put them). `steps` None uses the
    inference default DEFAULT_STAGE_C_TIMESTEPS; otherwise that many evenly spaced steps.
    """
    from diffusers import DDPMWuerstchenScheduler

    from wuerstchen_lora.models import DEFAULT_STAGE_C_TIMESTEPS

    _check_base_prior(prior)
    # A scheduler of its own: set_timesteps would otherwise change the training scheduler's state.
    pipeline = build_prior_pipeline(prior, text_encoder, tokenizer, DDPMWuerstchenScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    if prior.dtype != dtype or text_encoder.dtype != dtype:  # load_frozen_models leaves them in dtype already
        pipeline.to(dtype=dtype)
    pipeline.to(device)
    size = pipeline_height_for_side(side, pipeline.config.resolution_multiple)
    schedule = {"timesteps": DEFAULT_STAGE_C_TIMESTEPS} if steps is None else {"num_inference_steps": steps}
    was_training = prior.training
    prior.eval()  # the prior's dropout (0.1) must be off while sampling
    out = []
    try:
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            generators = [torch.Generator().manual_seed(_generation_seed(seed, start + k)) for k in range(n)]
            raw = pipeline(prompt=prompt, height=size, width=size, guidance_scale=guidance_scale, num_images_per_prompt=n,
                           generator=generators, output_type="pt", **schedule).image_embeddings
            out.append(pipeline_to_training_space(raw, pipeline).cpu())
    finally:
        prior.train(was_training)
    if not out:
        return torch.empty(0, prior.config.c_in, side, side)
    embeddings = torch.cat(out)
    assert embeddings.shape == (count, prior.config.c_in, side, side), embeddings.shape
    return embeddings


# ----------------------------------------------------------------------------------------------
# Real class images


@dataclasses.dataclass
class RealClassImages:
    embeddings: torch.Tensor  # float32 [n, C, side, side] on the CPU, training space
    paths: list  # the images used, in order
    skipped: list  # (path, reason) of unreadable images


def class_image_files(folder):
    """The image files of a class folder in the order they are used (sorted, subfolders included)."""
    return _list_images(folder) if folder and os.path.isdir(folder) else []


@torch.no_grad()
def real_class_embeddings(folder, encode_image, resolution, device, dtype, batch_size, limit=None):
    """Encode up to `limit` readable class images, centre-cropped at `resolution` exactly as the
    embedding cache crops training images (cache.image_for_cache); unreadable ones are skipped.

    `encode_image(pixels [n,3,R,R]) -> [n,C,R/32,R/32]` in the training space (objective.encode_images).
    """
    from PIL import Image

    from wuerstchen_lora.cache import encoder_pixels, image_for_cache

    paths, skipped, pending, out = [], [], [], []

    def flush():
        if pending:
            pixels = torch.cat(pending).to(device, dtype=dtype)
            out.append(encode_image(pixels).float().cpu())
            pending.clear()

    for path in class_image_files(folder):
        if limit is not None and len(paths) >= limit:
            break
        reason, _ = inspect_image(path)
        if reason:
            skipped.append((path, reason))
            continue
        with Image.open(path) as image:
            pending.append(encoder_pixels(image_for_cache(image, resolution, center_crop=True)))
        paths.append(path)
        if len(pending) == batch_size:
            flush()
    flush()
    side = resolution // 32
    embeddings = torch.cat(out) if out else torch.empty(0, 0, side, side)
    return RealClassImages(embeddings, paths, skipped)


# ----------------------------------------------------------------------------------------------
# Cache


def class_cache_parts(class_prompt, num_class_images, seed, side, dtype, model_id, revision, steps, guidance_scale,
                      resolution, class_data_dir=None, image_encoder_id=None):
    """Everything that changes the class examples; hashed into the cache folder's name."""
    from wuerstchen_lora.cache import stat_digest

    real = class_image_files(class_data_dir)
    local_model = bool(model_id) and os.path.isdir(model_id)  # a hub id stands for itself, with its revision
    return {
        "format": CLASS_CACHE_FORMAT,
        "prompt": class_prompt,
        "count": num_class_images,
        "seed": seed,
        "side": side,
        "dtype": str(dtype),
        "model": [model_id, revision] + ([stat_digest(os.path.join(model_id, sub)) for sub in ("prior", "text_encoder", "tokenizer", "scheduler")]
                                         if local_model else []),
        "generation": {"steps": steps, "guidance_scale": guidance_scale},
        # Real images: which files (and their contents, by size and mtime), the crop and the encoder.
        "real": None if not real else {
            "folder": os.path.abspath(class_data_dir),
            "files": stat_digest(class_data_dir),
            "resolution": resolution,
            "image_encoder": [image_encoder_id, stat_digest(image_encoder_id) if image_encoder_id and os.path.isfile(image_encoder_id) else None],
        },
    }


def class_cache_key(parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclasses.dataclass
class ClassSet:
    """The class examples of one run: embeddings (real ones first) and the class prompt's text embedding."""

    folder: str
    image_embeddings: torch.Tensor  # [N, C, side, side] in the run's dtype
    text_embeddings: torch.Tensor  # [77, d]: CLIP last_hidden_state of the class prompt
    real: int  # how many of the N come from real images
    reused: bool  # loaded from the cache

    @property
    def generated(self):
        return len(self.image_embeddings) - self.real


def load_class_set(folder):
    """The cached class examples in `folder`, or None when there are none (the file is written last)."""
    from safetensors import safe_open

    path = os.path.join(folder, CLASS_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        real = int(f.metadata()["real"])
        return ClassSet(folder, f.get_tensor("image_embeddings"), f.get_tensor("text_embeddings"), real, reused=True)


def _build_class_set(folder, parts, models, class_prompt, num_class_images, seed, resolution, device, dtype,
                     class_data_dir, encode_image, batch_size, steps, guidance_scale, log):
    """Encode real class images (first), generate the rest, encode the prompt; write one file."""
    from wuerstchen_lora.objective import encode_text

    prior, text_encoder, tokenizer, scheduler = models
    real = RealClassImages(torch.empty(0), [], [])
    if class_image_files(class_data_dir):
        if encode_image is None:
            raise ValueError("real class images need encode_image")
        real = real_class_embeddings(class_data_dir, encode_image, resolution, device, dtype, batch_size, limit=num_class_images)
        for path, reason in real.skipped[:5]:
            log(f"warning: --class_data_dir: skipping {path}: {reason}")
    missing = num_class_images - len(real.paths)
    log(f"class examples for {class_prompt!r}: {len(real.paths)} real images, generating {missing} embeddings with the base prior")
    generated = torch.empty(0) if missing == 0 else generate_class_embeddings(
        prior, text_encoder, tokenizer, scheduler, class_prompt, missing, seed, resolution // 32, device, dtype,
        batch_size=batch_size, steps=steps, guidance_scale=guidance_scale)
    embeddings = torch.cat([t for t in (real.embeddings, generated) if len(t)])
    text = encode_text(text_encoder, tokenizer, [class_prompt], device)[0]
    tensors = {"image_embeddings": embeddings.to(dtype).contiguous(), "text_embeddings": text.to("cpu", dtype).contiguous()}
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, CLASS_INFO), {"key": parts, "real_images": real.paths, "generated": missing})
    # Written last and atomically: its presence marks a complete cache.
    atomic_save_tensors(tensors, os.path.join(folder, CLASS_FILE), metadata={"real": str(len(real.paths)), "prompt": class_prompt})
    return ClassSet(folder, tensors["image_embeddings"], tensors["text_embeddings"], len(real.paths), reused=False)


def prepare_class_examples(cache_root, prior, text_encoder, tokenizer, scheduler, *, class_prompt, num_class_images, seed,
                           resolution, device, dtype, model_id, revision=None, class_data_dir=None, encode_image=None,
                           image_encoder_id=None, batch_size=4, steps=None, guidance_scale=4.0, accelerator=None):
    """The run's class examples: loaded from `<cache_root>/class-<key>/` when that exists, else built
    there (real images from `class_data_dir` first, up to `num_class_images`; the rest generated by
    the base prior, which must not carry the LoRA yet). Returns a ClassSet.

    With an accelerator, the main process builds while the others wait, then they read its cache.
    `model_id`/`revision` name the base prior and `image_encoder_id` the EfficientNet file (cache key).
    """
    if not class_prompt or not class_prompt.strip():
        raise UserError("--with_prior_preservation needs --class_prompt (e.g. \"a photo of a dog\")")
    if num_class_images < 1:
        raise UserError(f"--num_class_images {num_class_images}: prior preservation needs at least 1 class example")
    log = accelerator.print if accelerator is not None else print
    if class_data_dir and not os.path.isdir(class_data_dir):
        log(f"note: --class_data_dir {class_data_dir} does not exist; all class examples are generated (as embeddings, no images are written)")
    side = resolution // 32
    parts = class_cache_parts(class_prompt, num_class_images, seed, side, dtype, model_id, revision, steps, guidance_scale,
                              resolution, class_data_dir, image_encoder_id)
    folder = os.path.join(cache_root, f"class-{class_cache_key(parts)}")
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        cached = load_class_set(folder)
        if cached is not None:
            log(f"reusing class examples {folder} ({cached.real} real, {cached.generated} generated)")
            return cached
        return _build_class_set(folder, parts, (prior, text_encoder, tokenizer, scheduler), class_prompt, num_class_images, seed,
                                resolution, device, dtype, class_data_dir, encode_image, batch_size, steps, guidance_scale, log)


# ----------------------------------------------------------------------------------------------
# Training samples


def class_stream_seed(seed):
    """The seed of the class examples' noise/timestep stream: distinct from the instance samples'
    (sample_rng hashes "<seed>:<epoch>:<index>", and "class-<seed>" is never an instance seed)."""
    return f"class-{seed}"


class ClassExamples(torch.utils.data.Dataset):
    """Class examples as training samples, shaped like cache.CachedExamples' instance samples:
    {"image_embeddings", "text_embeddings", "noise", "timestep"}; noise and timestep drawn per
    (seed, epoch, index) from a stream of their own."""

    def __init__(self, class_set, seed, noise_offset=0.0):
        self.image_embeddings, self.text_embeddings = class_set.image_embeddings, class_set.text_embeddings
        self.seed, self.noise_offset, self.epoch = seed, noise_offset, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.image_embeddings)

    def __getitem__(self, index):
        image = self.image_embeddings[index]
        plan = sample_plan(class_stream_seed(self.seed), self.epoch, index)
        noise, timestep = sample_noise(plan.noise_seed, tuple(image.shape), self.noise_offset)
        return {"noise": noise, "timestep": timestep, "image_embeddings": image.clone(), "text_embeddings": self.text_embeddings}
