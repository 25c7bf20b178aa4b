"""The training recipe: set-up in the order the data flows, the loop, and what it writes. The flags
and the configuration they make are in flags.py and config.py; the usage page is the docstring of
train_wuerstchen_prior_lora.py, the script that runs `main`."""

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # the types Run declares; imported where they are used, after the flags are checked
    import accelerate
    import diffusers
    import peft
    import tqdm

    from wuerstchen_lora import cache, data, guard, subject, validation

from wuerstchen_lora.config import TrainConfig
from wuerstchen_lora.flags import check_lora_rank, check_lora_targets, parse_args, read_prior_config, warn
from wuerstchen_lora.models import UserError, atomic_write_json, quiet_library_logs
from wuerstchen_lora.objective import (
    compute_loss,
    encode_images,
    encode_text,
    scheduler_to,
    step_seed,
)
from wuerstchen_lora.outputs import (
    check_hub_access,
    delete_earlier_run,
    list_checkpoints,
    push_to_hub,
    register_lora_checkpoint_hooks,
    resume_checkpoint,
    save_checkpoint,
    args_record,
    training_info,
    write_outputs,
)
from wuerstchen_lora.validation import make_held_out_loss, make_validator

# ----------------------------------------------------------------------------------------------
# Set-up


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    out = cfg.output
    # Several processes and no GPU (a CPU test, or `accelerate launch --multi_gpu` on a CPU box):
    # accelerate only sets up gloo when told to use the CPU.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=distributed and not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.optim.mixed_precision,  # resolved with accelerate's own setting (build_config)
        log_with=None if out.report_to == "none" else out.report_to,
        project_config=ProjectConfiguration(project_dir=out.output_dir, logging_dir=os.path.join(out.output_dir, out.logging_dir)),
        # The seedable sampler shuffles each epoch from (seed, epoch): a resumed run sees the same order.
        # non_blocking: batches come from pinned memory (make_dataloader), so the copy to the GPU
        # does not make the host wait for the step before.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
        # accelerate's own torch.compile wraps the whole prior (a `_orig_mod.` prefix in every saved
        # key, one huge graph); --torch_compile compiles block by block instead (compile_blocks).
        dynamo_backend="no",
    )


def weight_dtype_for(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_frozen_models(model, device, dtype, tokenizer=None):
    """Prior, text encoder, tokenizer, scheduler and EfficientNet, all frozen, on `device` in `dtype`
    (`tokenizer`: the one the data checks loaded, reused)."""
    from wuerstchen_lora.models import (
        load_image_encoder,
        load_prior_components,
        use_sdpa_attention,
    )

    prior, text_encoder, tokenizer, scheduler = load_prior_components(model.pretrained_prior_model_name_or_path, model.revision, tokenizer)
    image_encoder = load_image_encoder(model.image_encoder)
    for model in (prior, text_encoder, image_encoder):
        model.requires_grad_(False).to(device, dtype=dtype)
    text_encoder.eval()
    image_encoder.eval()
    use_sdpa_attention(prior)
    return prior, text_encoder, tokenizer, scheduler, image_encoder


def add_lora(prior, lora, optim=None):
    """Attach a LoRA adapter (`lora`: LoraSettings) to the prior; returns (peft config, trainable
    params, their names). `optim` (OptimConfig): the prior's dropout and gradient checkpointing.

    The trainable LoRA weights are kept in fp32 even when the frozen prior is fp16/bf16: the fp16
    grad scaler refuses to unscale fp16 gradients, and small updates vanish in half precision.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora.lora_target_modules),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )
    try:
        prior.add_adapter(config)
    except ValueError as e:
        raise UserError(f"--lora_target_modules {','.join(lora.lora_target_modules)}: {str(e).splitlines()[0]}") from e
    from diffusers.training_utils import cast_training_params

    cast_training_params(prior, dtype=torch.float32)
    named = [(n, p) for n, p in prior.named_parameters() if p.requires_grad]
    # Activations stay in the prior's dtype into the LoRA matmuls: autocast casts the small fp32
    # LoRA weights instead of peft casting every activation to fp32 and back (a copy each way,
    # forward and backward, around every adapted projection). Every forward of the prior runs under
    # autocast when the weights are half precision (training, held-out loss, validation images).
    for module in prior.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    if optim is not None and optim.prior_dropout is not None:
        set_prior_dropout(prior, optim.prior_dropout)
    if optim is not None and optim.gradient_checkpointing:
        checkpoint_blocks(prior, optim.gradient_checkpointing)
    prior.train()  # dropout (0.1 in the shipped config) is active while training, as in both references
    return config, [p for _, p in named], [n for n, _ in named]


def set_prior_dropout(prior, rate):
    """The dropout rate of every Dropout in the prior (ResBlocks and attention outputs)."""
    for module in prior.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def checkpoint_blocks(prior, fraction):
    """Recompute the activations of `fraction` of the prior's blocks in the backward pass.

    fraction 1 is diffusers' own gradient checkpointing (every block). A smaller fraction wraps
    that share of the blocks, spread evenly over the depth, in torch.utils.checkpoint: memory
    falls roughly in proportion and so does the recomputation. diffusers has no per-block switch,
    hence the wrapper; it replaces the instances' forward, so module names (and the LoRA keys) stay.
    """
    if fraction >= 1:
        prior.enable_gradient_checkpointing()
        return
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = list(prior.blocks)
    chosen = sorted({int(i / fraction) for i in range(math.ceil(len(blocks) * fraction)) if int(i / fraction) < len(blocks)})
    for i in chosen:
        forward = blocks[i].forward
        blocks[i].forward = functools.wraps(forward)(
            lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False) if torch.is_grad_enabled() else _f(*a))


def norms_in_activation_dtype(prior, dtype):
    """Run the prior's LayerNorms and GlobalResponseNorms in `dtype` (bf16 when training in bf16)
    instead of autocast's choice.

    CUDA autocast computes layer_norm and norm in fp32 and returns fp32: every ResBlock then
    carries its 4x-wide GlobalResponseNorm output in fp32 and casts it back to bf16 for the next
    Linear, forward and backward. The kernels accumulate in fp32 internally either way, and the
    next Linear rounds to bf16, so results agree to bf16 precision (tested). Not for fp16, whose
    range a norm of 4x-wide activations can exceed.
    """
    from wuerstchen_lora.models import GlobalResponseNorm, WuerstchenLayerNorm

    for module in prior.modules():
        if isinstance(module, (WuerstchenLayerNorm, GlobalResponseNorm)):
            module.forward = _outside_autocast(type(module).forward.__get__(module), dtype)


def _outside_autocast(forward, dtype):
    def run(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.to(dtype))
    return run


def compile_blocks(prior, mode, backend):
    """Compile the prior's blocks one region at a time, in place (names, and so LoRA keys, stay).

    The 96 blocks are three classes (ResBlock, TimestepBlock, AttnBlock) repeated 32 times: one
    compiled graph per class and input shape serves every repetition, which compiles much faster
    than one whole-model graph and avoids whole-graph failures (inductor's CantSplit on torch 2.11).
    """
    options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    for block in prior.blocks:
        block.compile(backend=backend, dynamic=False, **options)


def uncompile_blocks(prior):
    """Back to eager: nn.Module.compile only sets this attribute."""
    for block in prior.blocks:
        block._compiled_call_impl = None


def make_optimizer(optim, params, device):
    """AdamW (PyTorch's fused kernel), 8-bit AdamW, Prodigy or Adafactor over the LoRA params."""
    adam = dict(lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)
    if optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **adam)
    if optim.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=optim.learning_rate, betas=adam["betas"], weight_decay=optim.adam_weight_decay)
    if optim.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the schedule comes from --lr_scheduler), no parameter-scale rescaling.
        return Adafactor(params, lr=optim.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=optim.adam_weight_decay)
    # The fused kernel takes `found_inf`, so a non-finite window is skipped on the device
    # (apply_update); on the CPU it needs torch >= 2.4.
    try:
        return torch.optim.AdamW(params, fused=True, **adam)
    except RuntimeError:
        return torch.optim.AdamW(params, **adam)


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(eq=False)
class LoadedData:
    """The training data after loading and checking, with what loading found out."""

    dataset: Any  # datasets.Dataset, the readable training rows
    image_column: str  # detected unless given
    caption_column: str
    held_out: Any  # the held-out dataset or None
    row_buckets: Optional[list]  # each row's (width, height) bucket, or None without buckets
    report: dict  # broken images, captions, buckets: training_info.json's "data"
    tokenizer: Any  # loaded for the caption checks; the models reuse it
    row_repeats: Optional[list] = None  # each row's repeats from kohya's N_name folders, or None


def load_data(cfg, accelerator):
    """The dataset, selected and checked before any model is loaded: columns, captions, and every
    image decoded once (each process checks its share). Unreadable images are dropped and counted;
    too many of them, or none left, stop the run here."""
    from transformers import CLIPTokenizer

    from wuerstchen_lora.data import caption_stats, check_captions, folder_shares, row_repeats
    from wuerstchen_lora.models import model_load_errors

    data, model = cfg.data, cfg.model
    loaded = {}  # what loading converted or left out
    with accelerator.main_process_first():
        dataset, image_column, caption_column = load_source(cfg, loaded)
    if data.max_train_samples is not None:
        dataset = dataset.shuffle(seed=cfg.seed).select(range(min(data.max_train_samples, len(dataset))))
    if loaded.get("unlisted_images") and accelerator.is_main_process:
        warn(f"{loaded['unlisted_images']} images in {data.dataset} are not listed in its metadata file and are left out")
    if loaded.get("ignored_caption_files") and accelerator.is_main_process:
        warn(f"{data.dataset} holds {loaded['caption_source']} and {loaded['ignored_caption_files']} same-stem caption files: the captions come from "
             f"{loaded['caption_source']} (column {caption_column!r}), the caption files are not read; remove {loaded['caption_source']} to use them")
    accelerator.print(f"captions: {describe_caption_source(cfg, loaded, caption_column)}")
    where = datasets_cache_line(cfg, dataset)
    if where:
        accelerator.print(where)
    if loaded.get("numeric_captions"):
        accelerator.print(f"note: the captions in column {caption_column!r} are numbers ({loaded['numeric_caption_dtype']}); "
                          f"{loaded['numeric_captions']} were converted to text, e.g. {loaded['numeric_caption_example']!r}")
    missing_captions = check_captions(dataset, caption_column, data.dataset, data.allow_missing_captions, loaded.get("missing_caption_example"),
                                      caption_files=loaded.get("caption_source") == "caption files")
    if missing_captions and accelerator.is_main_process:
        print(missing_captions, file=sys.stderr)
    with accelerator.main_process_first():
        with model_load_errors(model.pretrained_prior_model_name_or_path, "tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(model.pretrained_prior_model_name_or_path, subfolder="tokenizer", revision=model.revision)
        if not os.path.isdir(model.pretrained_prior_model_name_or_path) and read_prior_config(model.pretrained_prior_model_name_or_path, model.revision) is None:
            # Not in the hub cache when the flags were checked: fetch the small config now (the prior needs it anyway).
            config = read_prior_config(model.pretrained_prior_model_name_or_path, model.revision, download=True)
            check_lora_targets(cfg.lora.lora_target_modules, config)
            check_lora_rank(cfg.lora.rank, cfg.lora.lora_target_modules, config)
    check_caption_prefix(data.caption_prefix, tokenizer)
    sizes, bad = readable_images(cfg, accelerator, dataset, image_column)
    held_out, keep = split_held_out(cfg, accelerator, dataset, sorted(sizes), image_column, caption_column)
    report = {"bad_images": len(bad), "bad_examples": [f"{n}: {r}" for _, n, r in bad[:20]],
              "held_out_images": len(held_out) if held_out is not None else 0}
    row_buckets = None
    if data.aspect_ratio_buckets:
        keep, row_buckets, report["buckets"], report["too_small_for_bucket"] = bucket_rows(data, keep, sizes)
    dataset = dataset.select(keep) if len(keep) != len(dataset) else dataset
    report["images"] = len(dataset)
    report.update(caption_stats(dataset, caption_column, tokenizer, data.caption_prefix))  # with the prefix: what CLIP is given
    # Counted over the whole dataset, before --max_train_samples and the image checks.
    report["numeric_captions"], report["unlisted_images"] = loaded.get("numeric_captions", 0), loaded.get("unlisted_images", 0)
    report["non_utf8_caption_files"] = loaded.get("non_utf8_caption_files", 0)  # the training set's, not the held-out set's
    # What the detection chose (args.json records the flags as given: a detected column is null there).
    report["data_used"] = {"caption_source": loaded.get("caption_source") or ("--instance_prompt" if cfg.subject.instance_data_dir else "dataset column"),
                           "image_column_used": image_column, "caption_column_used": caption_column}
    repeats = row_repeats(dataset, loaded)
    if repeats is not None:
        report["folder_repeats"] = loaded["folder_repeats"]
        accelerator.print(folder_shares(dataset, loaded, data.repeats))
    return LoadedData(dataset, image_column, caption_column, held_out, row_buckets, report, tokenizer, repeats)


def datasets_cache_line(cfg, dataset):
    """Where `datasets` keeps its Arrow copy of the data (a metadata imagefolder, a .jsonl/.csv/.parquet
    file, a hub dataset; a folder of caption files is read in memory, without a copy): the start-up
    line says so, since local data lands in ~/.cache/huggingface/datasets unless --cache_dir is given."""
    files = [f.get("filename") for f in getattr(dataset, "cache_files", None) or [] if f.get("filename")]
    if not files:
        return None
    folder = os.path.dirname(os.path.commonpath(files)) if len(files) > 1 else os.path.dirname(files[0])
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    local = os.path.exists(cfg.data.dataset or "")
    hint = "; --cache_dir DIR puts it elsewhere" if cfg.data.cache_dir is None else " (--cache_dir)"
    return f"data: {'a copy of the local data' if local else 'the dataset'} ({size / 2**20:.1f} MiB, Arrow) is kept by datasets in {folder}{hint}"


def describe_caption_source(cfg, loaded, caption_column):
    """Where the captions come from, for the start-up lines: the file kind, caption files and their
    extensions, or the column."""
    if cfg.subject.instance_data_dir:
        return f"--instance_prompt {cfg.subject.instance_prompt!r} for every image"
    source = loaded.get("caption_source")
    if cfg.data.caption_from:
        return f"the image's {cfg.data.caption_from} name (--caption_from {cfg.data.caption_from})"
    if source == "caption files":
        used = loaded.get("caption_files") or {}
        files = ", ".join(f"{n} {ext}" for ext, n in sorted(used.items())) or "none"
        missing = loaded.get("missing_caption_files", 0)
        return f"same-stem caption files ({files}" + (f"; {missing} images without one" if missing else "") + ")"
    if source:
        return f"{source}, column {caption_column!r}"
    return f"column {caption_column!r}" + ("" if cfg.data.caption_column else " (detected; --caption_column names another)")


def check_caption_prefix(prefix, tokenizer):
    """A --caption_prefix that fills CLIP's 77 tokens (its start and end tokens included) leaves no
    room for any caption: every caption would be truncated away. Refused before the images are read."""
    if not prefix:
        return
    limit = tokenizer.model_max_length
    n = len(tokenizer(prefix).input_ids)
    if n >= limit:
        raise UserError(f"--caption_prefix is {n - 2} tokens long: with CLIP's start and end tokens that fills the {limit} the text encoder reads, "
                        f"so every caption would be cut off behind it; shorten it to well under {limit - 2} tokens (a trigger word or two)")


def load_source(cfg, stats):
    """(dataset, image column, caption column) from --dataset, or --instance_data_dir with its prompt."""
    from wuerstchen_lora.data import load_training_dataset, set_max_image_pixels

    data = cfg.data
    set_max_image_pixels(data.max_image_pixels)  # before any image is opened
    if cfg.subject.instance_data_dir:
        from wuerstchen_lora.subject import instance_dataset

        return instance_dataset(cfg.subject.instance_data_dir, cfg.subject.instance_prompt)
    return load_training_dataset(data.dataset, data.image_column, data.caption_column, cache_dir=data.cache_dir, stats=stats, config_name=data.dataset_config_name,
                                 caption_extension=data.caption_extension, allow_missing_captions=data.allow_missing_captions,
                                 folder_repeats=not data.no_folder_repeats, caption_from=data.caption_from)


def data_name(cfg):
    """The training data as the user named it, for messages and records."""
    return cfg.data.dataset or cfg.subject.instance_data_dir


def readable_images(cfg, accelerator, dataset, image_column):
    """Every image decoded once, each process its share: ({row: size} of the readable ones, the
    unreadable (row, name, reason)). Too many unreadable ones stop the run."""
    from accelerate.utils import gather_object

    from wuerstchen_lora.data import inspect_images

    share = range(accelerator.process_index, len(dataset), accelerator.num_processes)
    sizes, bad = inspect_images(dataset, image_column, share)
    sizes, bad = dict(gather_object(list(sizes.items()))), sorted(gather_object(bad))
    for index, name, reason in bad[:5]:
        accelerator.print(f"warning: skipping {name}: {reason}")
    if len(bad) > 5:
        accelerator.print(f"warning: ... and {len(bad) - 5} more unreadable images")
    flag = "--instance_data_dir" if cfg.subject.instance_data_dir else "--dataset"
    if len(bad) == len(dataset):
        raise UserError(f"{flag} {data_name(cfg)}: none of the {len(dataset)} images could be read (e.g. {bad[0][1]}: {bad[0][2]})")
    if len(bad) > cfg.data.max_bad_images * len(dataset):
        raise UserError(f"{flag} {data_name(cfg)}: {len(bad)} of {len(dataset)} images are unreadable, more than --max_bad_images {cfg.data.max_bad_images:g}; fix or remove them (first: {bad[0][1]}: {bad[0][2]})")
    return sizes, bad


def split_held_out(cfg, accelerator, dataset, keep, image_column, caption_column):
    """(held-out dataset or None, the training rows): --validation_split takes a seeded share of the
    readable rows; --validation_dataset loads another dataset."""
    validation = cfg.validation
    if validation.validation_split:
        n = max(1, round(len(keep) * validation.validation_split))
        if n >= len(keep):
            raise UserError(f"--validation_split {validation.validation_split:g} leaves no training images out of {len(keep)}")
        order = keep[:]
        random.Random(cfg.seed).shuffle(order)
        return dataset.select(sorted(order[:n])), sorted(order[n:])
    if validation.validation_dataset:
        return load_held_out_dataset(validation.validation_dataset, cfg.data.cache_dir, accelerator, image_column, caption_column), keep
    return None, keep


def load_held_out_dataset(spec, cache_dir, accelerator, image_column, caption_column):
    from wuerstchen_lora.data import inspect_images, load_training_dataset

    with accelerator.main_process_first():
        held_out, held_image, held_caption = load_training_dataset(spec, cache_dir=cache_dir)
    sizes, _ = inspect_images(held_out, held_image, range(len(held_out)))
    if not sizes:
        raise UserError(f"--validation_dataset {spec}: no readable images")
    held_out = held_out.select(sorted(sizes))
    return held_out.rename_columns({c: n for c, n in ((held_image, image_column), (held_caption, caption_column)) if c != n})


def bucket_rows(data, rows, sizes):
    """Each image's aspect-ratio bucket; images that would need more than --bucket_max_upscale
    enlargement to cover their bucket are left out (and counted)."""
    from wuerstchen_lora.data import assign_bucket, make_buckets, upscale_needed

    buckets = make_buckets(data.resolution)
    assigned = {i: assign_bucket(sizes[i], buckets) for i in rows}
    kept = [i for i in rows if upscale_needed(sizes[i], assigned[i]) <= data.bucket_max_upscale]
    if not kept:
        raise UserError(f"every image is smaller than its bucket by more than --bucket_max_upscale {data.bucket_max_upscale:g}; lower --resolution or raise the limit")
    counts = {}
    for i in kept:
        counts[f"{assigned[i][0]}x{assigned[i][1]}"] = counts.get(f"{assigned[i][0]}x{assigned[i][1]}", 0) + 1
    return kept, [assigned[i] for i in kept], counts, len(rows) - len(kept)


def common_bucket(row_buckets):
    """The most frequent (width, height) bucket, for validation images (None without buckets)."""
    if not row_buckets:
        return None
    return max(sorted(set(row_buckets)), key=row_buckets.count)


def caption_options(data):
    from wuerstchen_lora.data import CaptionOptions

    return CaptionOptions(prefix=data.caption_prefix, dropout=data.caption_dropout, shuffle_tags=data.shuffle_tags, keep_tokens=data.keep_tokens)


def cache_root(cfg):
    """Where embedding caches live: --embeddings_cache_dir, else OUTPUT_DIR/embeddings_cache."""
    return cfg.cache.embeddings_cache_dir or os.path.join(cfg.output.output_dir, "embeddings_cache")


def cached_examples(cfg, loaded, accelerator, encode_image, encode_text, dtype):
    """Build (or reuse) the embedding cache and return the dataset that reads from it."""
    from wuerstchen_lora.cache import CachedExamples, build_cache, cache_key
    from wuerstchen_lora.models import resolve_image_encoder_path

    data, columns = cfg.data, (loaded.image_column, loaded.caption_column)
    folder = os.path.join(cache_root(cfg), cache_key(cfg.model, data, loaded.dataset, columns, dtype, resolve_image_encoder_path(cfg.model.image_encoder), source=data_name(cfg)))
    build_cache(folder, loaded.dataset, columns, data, cfg.cache, encode_image, encode_text,
                accelerator=accelerator, captions=caption_options(data), row_buckets=loaded.row_buckets)
    raw = loaded.dataset[loaded.caption_column] if data.shuffle_tags else None
    return CachedExamples(folder, data.resolution, data.random_flip, cfg.seed, caption_options(data), raw, data.repeats, data.noise_offset,
                          per_row=loaded.row_repeats)


def uncached_examples(cfg, loaded, latent_channels):
    from wuerstchen_lora.data import CaptionedImages, ImageTransform

    data = cfg.data
    transform = ImageTransform(data.resolution, data.center_crop, data.random_flip)
    return CaptionedImages(loaded.dataset, loaded.image_column, loaded.caption_column, transform, cfg.seed, caption_options(data), data.repeats,
                           loaded.row_buckets, latent_channels=latent_channels, noise_offset=data.noise_offset, per_row=loaded.row_repeats)


def make_dataloader(cfg, examples, row_buckets=None, pin_memory=False, row_repeats=None):
    """Shuffled batches; with aspect-ratio buckets, each batch from one bucket (returns the sampler too).

    pin_memory (on a GPU): batches land in page-locked memory, so that their copy to the device
    can be queued without waiting (accelerate moves them with non_blocking=True)."""
    from wuerstchen_lora.data import BucketBatchSampler

    batch_size = cfg.optim.train_batch_size
    loader = dict(num_workers=cfg.data.dataloader_num_workers, pin_memory=pin_memory)
    if row_buckets is None:
        return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True, **loader), None
    sampler = BucketBatchSampler(row_buckets, batch_size, cfg.seed, cfg.data.repeats, row_repeats)
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, **loader), sampler


class Encoders:
    """EfficientNet and CLIP as functions of pixels and of captions, on one device and dtype.
    release_image_encoder() drops EfficientNet once the embedding cache holds what it would make."""

    def __init__(self, image_encoder, text_encoder, tokenizer, device, dtype):
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.device, self.dtype = device, dtype

    def image(self, pixels):
        return encode_images(self.image_encoder, pixels.to(self.device, dtype=self.dtype))

    def text(self, captions):
        return encode_text(self.text_encoder, self.tokenizer, captions, self.device)

    def release_image_encoder(self):
        self.image_encoder = None


def embed_batch(batch, encoders, device):
    """(image embeddings, text embeddings) of a batch: from the cache, or encoded now."""
    if "image_embeddings" in batch:
        image_embeddings = batch["image_embeddings"].to(device)
    else:
        image_embeddings = encoders.image(batch["pixel_values"])
    if "text_embeddings" in batch:
        return image_embeddings, batch["text_embeddings"].to(device)
    return image_embeddings, encoders.text(batch["caption"])


def class_batch(run, epoch, batch_index):
    """The class examples trained beside one micro-batch (prior preservation): a seeded order per
    epoch, each process and micro-batch its own slice, so a resumed run draws the same ones."""
    examples, size = run.class_examples, run.cfg.optim.train_batch_size
    examples.set_epoch(epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(step_seed(run.cfg.seed + 1, epoch, 0, 0) % 2**62))
    start = (batch_index * run.accelerator.num_processes + run.accelerator.process_index) * size
    items = [examples[int(order[(start + j) % len(examples)])] for j in range(size)]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    return {k: v.to(run.accelerator.device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Training


class NonFiniteLoss(Exception):
    """Too many NaN/inf losses in a row: the run stops, leaving the last good files as they were."""


class Interrupted(Exception):
    def __init__(self, signum, checkpoint):
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint


@contextlib.contextmanager
def stop_on_signals(run):
    """While training, SIGTERM/SIGINT ask for a checkpoint at the next optimiser step (a second
    signal stops at once). accelerate's trigger is all-reduced at every step, so all processes
    stop at the same step. Installed just before args.json is written; before that (loading,
    caching) there is nothing to save, and the defaults apply."""
    import signal

    def handler(signum, frame):
        run.stop_signals.append(signum)
        run.accelerator.set_trigger()
        signal.signal(signum, signal.SIG_DFL)

    run.stop_signals = []
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclasses.dataclass(eq=False)
class Run:
    """Everything a training run holds besides its frozen configuration, declared in one place, in
    the order setup() fills it."""

    cfg: TrainConfig
    accelerator: "accelerate.Accelerator"
    resume_plan: Optional["guard.ResumePlan"] = None  # the checkpoint to resume, checked before anything loads
    run_id: Optional[str] = None  # recorded in each checkpoint (kept on resume): only this run's checkpoints are pruned
    earlier_files: tuple = ()  # --overwrite_output_dir: the earlier run's entries, deleted when training starts
    data: Optional[LoadedData] = None  # the checked training data (setup_data)
    training_data: Optional[dict] = None  # its fingerprint, recorded in checkpoints and compared on resume
    # frozen parts
    dtype: torch.dtype = torch.float32
    encoders: Optional[Encoders] = None
    scheduler: Optional["diffusers.DDPMWuerstchenScheduler"] = None
    held_out_loss: Optional["validation.HeldOutLoss"] = None
    validate: Optional["validation.Validator"] = None
    class_examples: Optional["subject.ClassExamples"] = None  # with --with_prior_preservation
    # what trains
    examples: Optional["cache.CachedExamples | data.CaptionedImages"] = None
    lora_config: Optional["peft.LoraConfig"] = None
    params: Optional[list] = None  # the trainable LoRA weights: one list for the optimiser, clipping and EMA
    param_names: Optional[list] = None
    prior: Optional[torch.nn.Module] = None  # as accelerate prepared it
    unwrapped: Optional["diffusers.WuerstchenPrior"] = None  # the plain prior with its adapter
    optimizer: Optional["accelerate.optimizer.AcceleratedOptimizer"] = None
    lr_scheduler: Optional["accelerate.scheduler.AcceleratedScheduler"] = None
    dataloader: Optional[torch.utils.data.DataLoader] = None  # as accelerate prepared it
    bucket_sampler: Optional["data.BucketBatchSampler"] = None
    ema: Optional["diffusers.training_utils.EMAModel"] = None
    compiled: bool = False
    compiled_shapes: set = dataclasses.field(default_factory=set)
    steps_per_epoch: int = 0
    max_steps: int = 0
    validation_every: int = 0  # --validation_steps, or --validation_epochs in steps
    info: Optional[dict] = None  # training_info.json
    # the loop's own state (train())
    progress: Optional["tqdm.tqdm"] = None
    window_losses: list = dataclasses.field(default_factory=list)  # the accumulation window's losses, on the device
    pending: list = dataclasses.field(default_factory=list)  # (step, losses, finite, lr) not read back yet
    clock: list = dataclasses.field(default_factory=list)  # (step, time) at each read-back
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    stop_signals: list = dataclasses.field(default_factory=list)


def setup(cfg):
    """Everything the loop needs, in the order the data flows: data (checked before models load),
    frozen models, the embedding cache (built before the encoders leave the device), LoRA, then the
    optimiser and loop."""
    from wuerstchen_lora.guard import guard_run

    run = Run(cfg=cfg, accelerator=make_accelerator(cfg))
    check_hub_access(cfg.hub, run.accelerator)  # --push_to_hub: login and hub checked before anything is trained or deleted
    # The output-folder lock; the checkpoint checked, or a new run's folder found free of an earlier run, before anything loads.
    start = guard_run(cfg, run.accelerator)
    run.resume_plan, run.run_id, run.earlier_files = start.plan, start.run_id, start.earlier_files
    setup_data(run)
    prior = setup_frozen_models(run)
    examples = setup_examples(run, prior)
    trainable, total = setup_lora(run, prior)
    setup_loop(run, prior, examples, trainable, total)
    return run


def setup_data(run):
    """Logging, the output folder, and the data, loaded and checked before any model."""
    from wuerstchen_lora.guard import check_training_data

    cfg, accelerator = run.cfg, run.accelerator
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING if accelerator.is_main_process else logging.ERROR)
    quiet_library_logs()
    if cfg.optim.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(cfg.output.output_dir, exist_ok=True)
    run.data = load_data(cfg, accelerator)
    # The data's fingerprint: recorded, and compared on resume.
    run.training_data = check_training_data(run.resume_plan, data_name(run.cfg), run.data.dataset, (run.data.image_column, run.data.caption_column))


def setup_frozen_models(run):
    """The frozen prior, encoders and scheduler; the held-out set encoded, the decoder loaded, and
    the class examples made (before LoRA exists: they come from the base prior)."""
    cfg, accelerator = run.cfg, run.accelerator
    run.dtype = dtype = weight_dtype_for(accelerator)
    prior, text_encoder, tokenizer, run.scheduler, image_encoder = load_frozen_models(cfg.model, accelerator.device, dtype, run.data.tokenizer)
    run.encoders = Encoders(image_encoder, text_encoder, tokenizer, accelerator.device, dtype)
    # The held-out set is encoded now, while the encoders are on the device; the validation decoder is
    # loaded now too, so that a bad path stops the run before caching. Both None under FSDP (validation.py).
    run.held_out_loss = make_held_out_loss(run.data, cfg, accelerator, run.encoders)
    run.validate = make_validator(cfg, accelerator, text_encoder, tokenizer, run.scheduler, dtype, common_bucket(run.data.row_buckets))
    if cfg.subject.with_prior_preservation:
        run.class_examples = make_class_examples(run, prior)
    scheduler_to(run.scheduler, accelerator.device)
    return prior


def make_class_examples(run, prior):
    """Prior preservation's class examples: real --class_data_dir images first, the rest sampled as
    image embeddings from the base prior (before the adapter exists), both cached."""
    from wuerstchen_lora.models import resolve_image_encoder_path
    from wuerstchen_lora.subject import ClassExamples, prepare_class_examples

    cfg, encoders, subject = run.cfg, run.encoders, run.cfg.subject
    class_set = prepare_class_examples(
        cache_root(cfg), prior, encoders.text_encoder, encoders.tokenizer, run.scheduler, class_prompt=subject.class_prompt,
        num_class_images=subject.num_class_images, seed=cfg.seed, resolution=cfg.data.resolution, device=run.accelerator.device,
        dtype=run.dtype, model_id=cfg.model.pretrained_prior_model_name_or_path, revision=cfg.model.revision,
        class_data_dir=subject.class_data_dir, encode_image=encoders.image, image_encoder_id=resolve_image_encoder_path(cfg.model.image_encoder),
        batch_size=cfg.cache.cache_batch_size, accelerator=run.accelerator)
    run.accelerator.print(f"class examples: {class_set.real} real, {class_set.generated} generated by the base prior"
                          + (" (from the cache)" if class_set.reused else "") + f", in {class_set.folder}")
    return ClassExamples(class_set, cfg.seed, cfg.data.noise_offset)


def setup_examples(run, prior):
    """Training samples: from the embedding cache (built now), or encoded every step."""
    cfg = run.cfg
    if not cfg.cache.cache_embeddings:
        return uncached_examples(cfg, run.data, prior.config.c_in)
    examples = cached_examples(cfg, run.data, run.accelerator, run.encoders.image, run.encoders.text, run.dtype)
    # The encoders are done: EfficientNet goes; CLIP waits on the CPU for validation prompts,
    # unless shuffled tags need it every step.
    run.encoders.release_image_encoder()
    if not cfg.data.shuffle_tags:
        run.encoders.text_encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return examples


def setup_lora(run, prior):
    """The adapter (fresh, or --init_lora's weights), the bf16 norms and compiled blocks; returns
    (trainable, total) parameter counts."""
    cfg, accelerator = run.cfg, run.accelerator
    torch.manual_seed(cfg.seed)  # the LoRA initialisation: same seed, same run
    run.lora_config, run.params, run.param_names = add_lora(prior, cfg.lora, cfg.optim)
    if cfg.lora.init_lora:
        from wuerstchen_lora.warmstart import load_init_lora, read_init_lora

        load_init_lora(prior, read_init_lora(cfg.lora.init_lora)[0])
        accelerator.print(f"note: LoRA weights start from --init_lora {cfg.lora.init_lora} (a warm start: fresh optimiser and schedule)")
    trainable, total = sum(p.numel() for p in run.params), sum(p.numel() for p in prior.parameters())
    accelerator.print(f"LoRA: {trainable:,} trainable of {total:,} prior parameters ({100 * trainable / total:.2f}%)")
    if run.dtype == torch.bfloat16:
        norms_in_activation_dtype(prior, run.dtype)
    if cfg.optim.torch_compile:
        compile_blocks(prior, cfg.optim.torch_compile, cfg.optim.torch_compile_backend)
        run.compiled = True
    return trainable, total


def setup_loop(run, prior, examples, trainable, total):
    """Optimiser, data loader and schedule through accelerate, EMA, and the run's record."""
    cfg, optim, accelerator = run.cfg, run.cfg.optim, run.accelerator
    optimizer = make_optimizer(optim, run.params, accelerator.device)
    run.examples = examples
    dataloader, run.bucket_sampler = make_dataloader(cfg, examples, run.data.row_buckets, pin_memory=accelerator.device.type == "cuda", row_repeats=run.data.row_repeats)
    run.prior, run.optimizer, run.dataloader = accelerator.prepare(prior, optimizer, dataloader)
    run.steps_per_epoch = math.ceil(len(run.dataloader) / optim.gradient_accumulation_steps)
    run.max_steps = optim.max_train_steps or optim.num_train_epochs * run.steps_per_epoch
    run.validation_every = cfg.validation.validation_steps or cfg.validation.validation_epochs * run.steps_per_epoch

    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimiser step, hence the factor.
    run.lr_scheduler = accelerator.prepare(get_scheduler(optim.lr_scheduler, run.optimizer, num_warmup_steps=optim.lr_warmup_steps * accelerator.num_processes,
                                                         num_training_steps=run.max_steps * accelerator.num_processes))
    run.unwrapped = accelerator.unwrap_model(run.prior)
    if optim.use_ema:
        from diffusers.training_utils import EMAModel

        # diffusers' EMA: the decay ramps up as (1 + n) / (10 + n) to --ema_decay; its state is checkpointed.
        run.ema = EMAModel(run.params, decay=optim.ema_decay)
        run.ema.to(accelerator.device)
        # Checkpointed by the hooks below as safetensors, not through accelerate's register_for_checkpointing
        # (a pickle accelerate reads back with a full unpickler: a planted file would run code on resume).
    run.info = training_info(cfg, accelerator, run.lora_config, 0, trainable, total)
    run.info["loss_history"] = []  # [step, training loss] of every step of this run (None: skipped)
    if run.class_examples is not None:
        run.info["class_loss_history"] = []  # [step, class loss] (prior preservation)
    run.info["data"] = run.data.report
    register_lora_checkpoint_hooks(accelerator, run.unwrapped, run.lora_config, run.info, run.ema, run.param_names)
    return run


def training_step(run, batch, epoch, batch_index):
    """One micro-batch: forward and backward; at the end of an accumulation window, the update.

    Returns None inside a window; at its end, (the window's mean loss over every process, whether
    all of it was finite), both still on the device: nothing here waits for the GPU, so the host
    queues the next step while this one runs. A non-finite loss still goes through backward (its
    NaN reaches every process's gradients through DDP), and the whole window's update is skipped
    everywhere alike (apply_update).
    """
    cfg, accelerator = run.cfg, run.accelerator
    torch.manual_seed(step_seed(cfg.seed, epoch, batch_index, accelerator.process_index))
    with accelerator.accumulate(run.prior):
        loss = batch_loss(run, batch)
        parts = [loss.detach()]
        if run.class_examples is not None:
            # Prior preservation: the class examples in a forward of their own after the instance
            # one, so that the instance loss (and its dropout draws) are those of a plain run.
            class_loss = batch_loss(run, class_batch(run, epoch, batch_index))
            loss = loss + cfg.subject.prior_loss_weight * class_loss
            parts = [loss.detach(), parts[0], class_loss.detach()]
        accelerator.backward(loss)
        run.window_losses.append(torch.stack(parts))
        if not accelerator.sync_gradients:
            return None
        losses = accelerator.gather(torch.stack(run.window_losses)).float()  # [micro-steps x processes, parts]
        run.window_losses = []
        finite = torch.isfinite(losses[:, 0]).all()
        apply_update(run, finite)
        run.lr_scheduler.step()  # in step with global_step even when the update is skipped
        run.optimizer.zero_grad(set_to_none=True)
    return losses.mean(0), finite


def batch_loss(run, batch):
    optim = run.cfg.optim
    image_embeddings, text_embeddings = embed_batch(batch, run.encoders, run.accelerator.device)
    return compute_loss(run.prior, run.scheduler, image_embeddings, text_embeddings, batch["noise"], batch["timestep"], optim.loss_weighting, optim.snr_gamma)


def apply_update(run, finite):
    """Clip and step; the update is skipped where `finite` (a device tensor) is false.

    Fused AdamW (the default) takes the `found_inf` flag that GradScaler uses and leaves weights and
    state untouched where it is 1: the skip happens on the device. Under fp16, GradScaler sets that
    flag itself from the gradients (a non-finite loss makes them non-finite). Other optimisers have
    no such input, so for them the flag is read on the host: one wait per update.
    """
    if run.cfg.optim.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm)
    inner = run.optimizer.optimizer
    if run.accelerator.scaler is None and getattr(inner, "defaults", {}).get("fused"):
        inner.found_inf = (~finite).float()
        try:
            run.optimizer.step()
        finally:
            del inner.found_inf
    elif run.accelerator.scaler is not None or bool(finite):
        run.optimizer.step()
    else:
        return
    if run.ema is not None:  # after a skipped update it averages in the unchanged weights
        run.ema.step(run.params)


def guarded_step(run, batch, epoch, batch_index):
    """training_step, with a way back to eager mode under --torch_compile.

    The first step at each input shape compiles. If that fails, the run prints one warning,
    restores the gradients it had, and redoes the micro-batch eagerly: an optimisation flag
    never ends a run.
    """
    shape = tuple(batch["image_embeddings" if "image_embeddings" in batch else "pixel_values"].shape)
    if not run.compiled or shape in run.compiled_shapes:
        return training_step(run, batch, epoch, batch_index)
    grads = [None if p.grad is None else p.grad.clone() for p in run.params]
    losses, micro_step = list(run.window_losses), run.accelerator.step
    try:
        result = training_step(run, batch, epoch, batch_index)
    except (RuntimeError, AssertionError, TypeError, ValueError, NotImplementedError, AttributeError, OSError) as e:
        uncompile_blocks(run.unwrapped)
        run.compiled = False
        for p, g in zip(run.params, grads):
            p.grad = g
        run.window_losses, run.accelerator.step = losses, micro_step
        root = e
        while getattr(root, "inner_exception", None) or root.__cause__:  # dynamo wraps the backend's own error
            root = getattr(root, "inner_exception", None) or root.__cause__
        cause = (str(root).strip().splitlines() or [""])[0][:200]
        run.progress.write(f"warning: --torch_compile failed ({type(root).__name__}: {cause}); training goes on in eager mode", file=sys.stderr)
        return training_step(run, batch, epoch, batch_index)
    run.compiled_shapes.add(shape)
    return result


def after_update(run, loss, finite, global_step):
    """Bookkeeping after an optimiser step: losses are read back every --logging_steps (and before
    checkpoints and validation), the only points between checkpoints where the host waits."""
    out = run.cfg.output
    run.pending.append((global_step, loss, finite, run.lr_scheduler.get_last_lr()[0]))
    run.progress.update(1)  # redraws at most every 0.1 s
    run.info["global_step"] = global_step
    checkpoint = out.checkpointing_steps and global_step % out.checkpointing_steps == 0
    validation = global_step % run.validation_every == 0
    if not (checkpoint or validation or global_step % out.logging_steps == 0 or global_step >= run.max_steps):
        return
    read_losses(run)
    # Several processes agree on stopping through an all-reduce; one process just reads its flag.
    stop = run.accelerator.check_trigger() if run.accelerator.num_processes > 1 else bool(run.stop_signals)
    if stop or checkpoint:
        path = save_checkpoint(run.accelerator, run.cfg, run.training_data, global_step, run.run_id)
        if run.accelerator.is_main_process:
            run.progress.write(f"step {global_step}: saved checkpoint {path}")
        if stop:
            raise Interrupted(run.stop_signals[0] if run.stop_signals else 15, path)
    if validation:
        validate(run, global_step)


def read_losses(run):
    """Read the losses of the steps since the last read in one copy, log each at its own step, and
    apply the non-finite guard (noticed here, at most --logging_steps late)."""
    if not run.pending:
        return
    steps, losses, finites, lrs = zip(*run.pending)
    run.pending = []
    rows = torch.cat([torch.stack(losses), torch.stack(finites).float()[:, None]], dim=1).tolist()  # [loss parts..., finite] per step
    values = [row[0] for row in rows]
    for step, row, lr in zip(steps, rows, lrs):
        loss, finite = row[0], row[-1]
        run.nonfinite_in_a_row = 0 if finite else run.nonfinite_in_a_row + 1
        run.nonfinite_total += not finite
        if run.nonfinite_in_a_row >= run.cfg.optim.max_nonfinite_steps:
            last = list_checkpoints(run.cfg.output.output_dir)
            raise NonFiniteLoss(
                f"stopped at step {step}: {run.nonfinite_in_a_row} non-finite losses in a row (NaN/inf). "
                f"Last good checkpoint: {last[-1][1] if last else 'none'}. Try --mixed_precision bf16 or a lower --learning_rate"
            )
        logs = {"train/lr": lr, "train/skipped_steps": run.nonfinite_total}
        if finite:
            logs["train/loss"] = logs["train_loss"] = loss  # train_loss: the diffusers example's tag, for dashboards built on it
            if len(row) == 4:  # prior preservation: total, instance, class, finite
                logs["train/instance_loss"], logs["train/class_loss"] = row[1], row[2]
        run.accelerator.log(logs, step=step)
        run.info["loss_history"].append([step, loss if finite else None])
        if len(row) == 4:
            run.info["class_loss_history"].append([step, row[2] if finite else None])
    run.progress.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lrs[-1]:.2e}", refresh=False)
    run.clock.append((steps[-1], time.perf_counter()))  # the device has just caught up: a true time


def speed_report(run):
    """Seconds per optimiser step, the median over the windows between loss reads after the first
    (which holds compilation and warm-up), and the peak GPU memory: written to training_info.json."""
    rates = sorted((t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(run.clock[1:], run.clock[2:]) if s1 > s0)
    report = {"s_per_step": round(rates[len(rates) // 2], 5) if rates else None, "windows": len(rates)}
    if torch.cuda.is_available() and run.accelerator.device.type == "cuda":
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return report


def validate(run, global_step):
    """Held-out loss and validation images, on the main process (the others go on to the next step)."""
    if not run.accelerator.is_main_process:
        return
    if run.held_out_loss is not None:
        loss = run.held_out_loss(run.unwrapped, run.scheduler, run.accelerator)
        run.info.setdefault("validation_loss", {})[str(global_step)] = loss
        run.accelerator.log({"val/loss": loss}, step=global_step)
        run.progress.write(f"step {global_step}: validation loss {loss:.4f}")
    if run.validate:
        paths = run.validate(run.unwrapped, global_step)
        if paths:
            run.progress.write(f"step {global_step}: {len(paths)} validation image{'s' * (len(paths) != 1)} in {os.path.dirname(paths[0])}")


def train(cfg):
    run = setup(cfg)
    accelerator, optim = run.accelerator, cfg.optim
    global_step = resume_checkpoint(run, cfg) if run.resume_plan else 0
    if run.earlier_files:  # --overwrite_output_dir: now that the new run has loaded and is about to write
        if accelerator.is_main_process:
            delete_earlier_run(cfg.output.output_dir, run.earlier_files)
        accelerator.wait_for_everyone()
    if cfg.output.report_to != "none":
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.flat().items()}
        accelerator.init_trackers(cfg.output.tracker_project_name, config=tracked)
    from wuerstchen_lora.data import describe_effective_batch

    # True also for a dataset smaller than one batch or one accumulation window (windows end with the epoch).
    effective_batch = describe_effective_batch(len(run.dataloader.dataset), optim.train_batch_size, accelerator.num_processes, optim.gradient_accumulation_steps,
                                               len(run.dataloader), padded=accelerator.num_processes > 1 or run.bucket_sampler is not None)
    precision = "fp32" if optim.mixed_precision == "no" else optim.mixed_precision
    accelerator.print(f"{len(run.dataloader.dataset)} samples, {run.max_steps} steps, {effective_batch}, {precision} on {accelerator.device}")
    if not optim.max_train_steps and optim.lr_scheduler != "constant" and optim.lr_warmup_steps >= run.max_steps and accelerator.is_main_process:
        warn(f"--lr_warmup_steps {optim.lr_warmup_steps} is not shorter than the run ({run.max_steps} steps): "
             f"the learning rate never reaches --learning_rate {optim.learning_rate:g}")

    from tqdm.auto import tqdm

    run.progress = tqdm(total=run.max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    with run.progress, stop_on_signals(run):  # the bar closes on any exit: an error starts on its own line
        # Written once signals are handled: from the moment args.json exists, a SIGTERM ends in a
        # checkpoint (at the first update if none has run yet), never in the default exit.
        if accelerator.is_main_process:
            atomic_write_json(os.path.join(cfg.output.output_dir, "args.json"), args_record(cfg, run.info))
        global_step = run_epochs(run, global_step)
    finish(run, global_step)
    return global_step


def run_epochs(run, global_step):
    """The loop: epochs of micro-batches from the resume point; returns the last optimiser step."""
    accumulation, accelerator = run.cfg.optim.gradient_accumulation_steps, run.accelerator
    run.clock.append((global_step, time.perf_counter()))
    # Resume point: whole epochs done, then the batches of the current epoch already consumed.
    first_epoch, skip = divmod(global_step, run.steps_per_epoch) if global_step < run.max_steps else (math.ceil(run.max_steps / run.steps_per_epoch), 0)
    skip *= accumulation
    for epoch in range(first_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        run.dataloader.set_epoch(epoch)  # the data order...
        run.examples.set_epoch(epoch)  # ...and augmentation, captions and noise (accelerate skips this with several processes)
        if run.bucket_sampler is not None:
            run.bucket_sampler.set_epoch(epoch)  # a custom batch sampler under accelerate's shard: ours to set
        batches = accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            update = guarded_step(run, batch, epoch, batch_index)
            if update is not None:
                global_step += 1
                after_update(run, *update, global_step)
                if global_step >= run.max_steps:
                    break
        skip = 0
    read_losses(run)  # steps since the last read, when the data ran out before a logging step
    return global_step


def finish(run, global_step):
    """The final validation, the output files, the summary and the upload. A run whose every update
    was skipped (non-finite losses) has trained nothing: it fails instead of writing the LoRA it
    started from."""
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.wait_for_everyone()
    history = run.info["loss_history"]
    if history and all(loss is None for _, loss in history):
        last = [p for s, p in list_checkpoints(cfg.output.output_dir) if s <= global_step - len(history)]  # from before this run
        raise NonFiniteLoss(
            f"every update of this run ({len(history)} of {len(history)}) was skipped for a non-finite loss (NaN/inf), so the LoRA "
            f"did not train and no final files were written. Last good checkpoint: {last[-1] if last else 'none'}. "
            f"Check --noise_offset, --learning_rate and --lora_alpha, or try --mixed_precision bf16")
    run.info["global_step"] = global_step
    run.info["data"]["skipped_nonfinite_steps"] = run.nonfinite_total
    run.info["speed"] = speed_report(run)
    if global_step % run.validation_every:  # the final state, unless it was just validated
        validate(run, global_step)
    write_outputs(run, cfg, run.info)
    print_summary(accelerator, run.info["data"])
    if accelerator.is_main_process:
        print_written(cfg, run.validate is not None)
    accelerator.end_training()
    if cfg.hub.push_to_hub and accelerator.is_main_process:
        push_to_hub(cfg.hub, cfg.output.output_dir)


def print_summary(accelerator, report):
    """One `data summary:` line of what was skipped, converted or truncated; nothing when all is zero."""
    lines = [f"skipped {report['bad_images']} unreadable images" + (f" (e.g. {report['bad_examples'][0]})" if report["bad_examples"] else "")] if report.get("bad_images") else []
    for key, text in (("empty_captions", "empty captions (trained as unconditional)"), ("long_captions", "captions longer than 77 tokens (truncated)"),
                      ("non_utf8_caption_files", "caption files not in UTF-8 (read as Latin-1)"), ("skipped_nonfinite_steps", "steps skipped for a non-finite loss"),
                      ("numeric_captions", "numeric captions (converted to text)"), ("unlisted_images", "images not listed in the metadata (left out)")):
        if report.get(key):
            lines.append(f"{report[key]} {text}")
    if lines:
        accelerator.print("data summary: " + "; ".join(lines))


def print_written(cfg, validated):
    """The last line of a run: what it wrote, where (the files that exist: the card's pictures need matplotlib)."""
    from wuerstchen_lora.models import LORA_WEIGHTS_NAME
    from wuerstchen_lora.outputs import EMA_WEIGHTS_NAME, PEFT_ADAPTER_DIR

    out = cfg.output.output_dir
    names = [(LORA_WEIGHTS_NAME, "the LoRA"), (EMA_WEIGHTS_NAME, "its EMA"), (PEFT_ADAPTER_DIR, "the PEFT adapter"), ("README.md", "the model card"),
             ("validation_grid.png", "the validation grid"), ("loss_curve.png", "the loss curve"), ("training_info.json", None), ("args.json", None)]
    parts = [f"{text} {name}" if text else name for name, text in names if os.path.exists(os.path.join(out, name))]
    if validated and os.path.isdir(os.path.join(out, "validation")):
        parts.append("validation/ (every validation's images)")
    if cfg.output.report_to != "none" and os.path.isdir(os.path.join(out, cfg.output.logging_dir)):
        parts.append(f"{cfg.output.logging_dir}/ (the {cfg.output.report_to} logs)")
    print(f"wrote to {out}: " + ", ".join(parts), flush=True)


def main(argv=None):
    from wuerstchen_lora.guard import release_run_lock, write_failure_message

    cfg = None
    try:
        cfg = parse_args(argv)
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"interrupted: saved {e.checkpoint}; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be written; nothing was saved", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk, a read-only or forbidden folder: one line; anything else: the traceback
        message = write_failure_message(e, cfg.output.output_dir if cfg else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        release_run_lock()
    return 0

