"""The command line: the training flags, their checks across each other, and what they leave open
resolved (LoRA alpha and targets, the optimiser, precision and compilation from accelerate's own
settings, --init_lora's file), frozen into a config.TrainConfig. Nothing heavy loads here."""

import argparse
import math
import os
import re
import sys

import torch

from wuerstchen_lora.models import (
    DEFAULT_DECODER,
    DEFAULT_LORA_TARGETS,
    DEFAULT_PRIOR,
    UserError,
)

# Which of the prior's Linear layers get LoRA (REFERENCE.md lists them). "mapper" is the
# TimestepBlock's; peft matches names by suffix, so "mapper" does not catch kv_mapper or cond_mapper.
LORA_TARGET_PRESETS = {
    "attn": DEFAULT_LORA_TARGETS,
    "attn-mlp": DEFAULT_LORA_TARGETS + ("channelwise.0", "channelwise.4"),
    "all-linear": DEFAULT_LORA_TARGETS + ("channelwise.0", "channelwise.4", "kv_mapper.1", "mapper", "cond_mapper.0", "cond_mapper.2"),
}
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# The largest whole number every consumer takes: torch sizes and seeds are C int64, and
# itertools.islice (the batch sampler) stops at sys.maxsize. A whole-number flag above it fails deep
# in torch with an OverflowError; number(int) refuses it on the command line instead.
INT64_MAX = 2**63 - 1


def parse_whole(text):
    """A whole number from `text`, also in exponent notation (1e9, 2.5e3); ValueError otherwise."""
    from decimal import Decimal, InvalidOperation

    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite() or value != value.to_integral_value() or value.adjusted() > 1000:
        raise ValueError(text)
    return int(value)


def short(value):
    """A whole number for a message: as it is up to 20 digits, else 3 significant digits (1.23e+30)."""
    digits = str(abs(value))
    if len(digits) <= 20:
        return str(value)
    return f"{'-' * (value < 0)}{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"


def number(cast, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float within bounds (None: unbounded on that side; an int
    is always at most INT64_MAX, what torch and islice take)."""
    if low is None and high is None:
        what = None  # any finite number
    elif high is None:
        what = "positive" if low == 0 and low_open else f"{low:g} or more"
    elif low is None:
        what = f"{high:g} or less"
    else:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text):
        try:
            value = parse_whole(text) if cast is int else cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if cast is int else 'a number'} (got {text})") from None
        if cast is not int and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        shown = short(value) if cast is int else f"{value:g}"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what} (got {shown})")
        if cast is int and abs(value) > INT64_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX} (2**63 - 1, the largest whole number torch takes; got {shown})")
        return value

    parse.__name__ = cast.__name__
    parse.numeric = True  # attach_negative_numbers: its values may start with '-'
    return parse


# torch.manual_seed takes [0, 2**64), numpy's generators (datasets' shuffle) no negative seed, and
# accelerate's seedable sampler seeds each epoch with seed + epoch: [0, 2**63) leaves it the room.
SEED_LIMIT = 2**63


def seed_number(tell):
    """An argparse type for --seed: a whole number, reduced into [0, 2**63) when outside it, with a
    `note:` line (through `tell`) saying which seed is used; the same flag always gives the same seed."""

    def parse(text):
        try:
            value = parse_whole(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text})") from None
        if not 0 <= value < SEED_LIMIT:
            reduced = value % SEED_LIMIT
            tell(f"note: --seed {text} is outside [0, 2**63), the seeds torch, numpy and accelerate all take; using {reduced} (the seed modulo 2**63)")
            value = reduced
        return value

    parse.__name__ = "int"
    parse.numeric = True
    return parse


POSITIVE_INT, POSITIVE, NON_NEGATIVE_INT, NON_NEGATIVE = number(int, 0, low_open=True), number(float, 0, low_open=True), number(int, 0), number(float, 0)
PROBABILITY = number(float, 0, 1, high_open=True)  # [0, 1)
unit_fraction = number(float, 0, 1, low_open=True)  # (0, 1]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (UserError) instead of usage + exit."""

    def error(self, message):
        raise UserError(re.sub(r"^argument (--\w+)(?:/\S+)?: ", r"\1 ", message))


# ----------------------------------------------------------------------------------------------
# Arguments


def add_model_flags(p):
    """The model parts and the adapter."""
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_prior_model_name_or_path", default=DEFAULT_PRIOR, help="hub id or local folder laid out like warp-ai/wuerstchen-prior")
    g.add_argument("--revision", default=None, help="hub revision of the prior repo")
    g.add_argument("--image_encoder", default=None, help="EfficientNet weights: .pt/.pth (Stage-B checkpoint or bare state dict) or .safetensors; default: model_v2_stage_b.pt from dome272/wuerstchen")
    g.add_argument("--pretrained_decoder_model_name_or_path", default=DEFAULT_DECODER, help="decoder repo, only used for validation images")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=POSITIVE_INT, default=8, help="LoRA rank")
    g.add_argument("--lora_alpha", type=POSITIVE, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    g.add_argument("--lora_dropout", type=PROBABILITY, default=0.0)
    g.add_argument("--lora_targets", default="attn", choices=sorted(LORA_TARGET_PRESETS), help="which Linear layers get LoRA: attention projections (default), + the ResBlock MLPs, or every Linear")
    g.add_argument("--lora_target_modules", default=None, help="explicit comma-separated module names (overrides --lora_targets), e.g. to_q,to_k,to_v,to_out.0")
    g.add_argument("--use_dora", action="store_true", help="weight-decomposed LoRA (DoRA, peft)")
    g.add_argument("--use_rslora", action="store_true", help="rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r (peft)")
    g.add_argument("--init_lora", default=None, metavar="PATH_OR_REPO",
                   help="start from an existing prior LoRA (a .safetensors file, a training output folder or a hub repo): a warm start with a fresh optimiser, "
                        "not a resume; rank, alpha and targets come from the file")


def add_data_flags(p):
    """Datasets, augmentation, captions and the embedding cache."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--dataset_name", "--train_data_dir", dest="dataset", default=None, help="hub dataset, local folder (imagefolder or images + .txt captions) or .jsonl/.csv/.parquet file")
    g.add_argument("--dataset_config_name", default=None, help="the configuration of a hub dataset that has several (passed to datasets.load_dataset)")
    g.add_argument("--image_column", default=None, help="default: detected")
    g.add_argument("--caption_column", default=None, help="default: detected")
    g.add_argument("--max_train_samples", type=POSITIVE_INT, default=None, help="use only this many samples (shuffled with --seed)")
    g.add_argument("--cache_dir", default=None, help="where datasets and models downloaded from the hub are stored")
    g.add_argument("--resolution", type=POSITIVE_INT, default=768, help="training size in px; 768 matches 1024 px output (REFERENCE: stride 32 vs 42.67)")
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", dest="center_crop", action="store_true", help="crop the centre square")
    crop.add_argument("--random_crop", dest="center_crop", action="store_false", help="crop a random square (default)")
    g.add_argument("--random_flip", action="store_true", help="flip horizontally with probability 0.5")
    g.add_argument("--aspect_ratio_buckets", action="store_true", help="train each image at the bucket (sides multiple of 32, about resolution^2 pixels) nearest its aspect ratio instead of a square crop")
    g.add_argument("--bucket_max_upscale", type=number(float, 1), default=2.0, help="with buckets: leave out images that would need more enlargement than this")
    g.add_argument("--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0)
    g.add_argument("--repeats", type=POSITIVE_INT, default=1, help="how often each image appears per epoch (a multiplier of kohya's N_name folder repeats)")
    g.add_argument("--caption_prefix", default="", help='prepended to every caption, e.g. "sks style, "')
    g.add_argument("--caption_dropout", type=PROBABILITY, default=0.0, help="probability of training a sample on the empty caption")
    g.add_argument("--shuffle_tags", action="store_true", help="shuffle comma-separated tags each time a sample is drawn (captions are then encoded every step)")
    g.add_argument("--keep_tokens", type=NON_NEGATIVE_INT, default=0, help="with --shuffle_tags: the first N tags stay in place")
    g.add_argument("--max_image_pixels", type=NON_NEGATIVE_INT, default=None, help="images with more pixels are refused as possible decompression bombs "
                   "(default: PIL's limit, 89478485 pixels x 2); raise it for large trusted images, 0 for no limit")
    g.add_argument("--max_bad_images", type=PROBABILITY, default=0.05, help="largest share of unreadable images to skip before refusing to train")
    g.add_argument("--allow_missing_captions", action="store_true", help="train even when more than half of the captions are missing or empty (they train as the empty caption)")
    g.add_argument("--caption_extension", default=".txt", help="a folder's caption files: same stem, this extension (kohya's flag); .txt and .caption are read as well")
    g.add_argument("--caption_from", default=None, choices=["folder", "filename"], help="caption a folder's images by name instead of caption files: "
                   "the folder's (kohya: 10_sks dog/ gives 'sks dog') or the file's stem (underscores as spaces)")
    g.add_argument("--no_folder_repeats", action="store_true", help="read N_name subfolders as plain folders (by default kohya's N_name folder trains each of its images N times per epoch, times --repeats)")
    cache = g.add_mutually_exclusive_group()
    cache.add_argument("--cache_embeddings", dest="cache_embeddings", action="store_true", default=True, help="encode images and captions once and train from the cache (default; see wuerstchen_lora/cache.py for random crops)")
    cache.add_argument("--no_cache_embeddings", dest="cache_embeddings", action="store_false", help="run EfficientNet and CLIP on every step (pixel-exact random crops)")
    g.add_argument("--embeddings_cache_dir", default=None, help="where the cache lives (default: OUTPUT_DIR/embeddings_cache); share one between runs")
    g.add_argument("--cache_batch_size", type=POSITIVE_INT, default=8, help="images encoded per EfficientNet call while the cache is built (images of one size go together); lower it if caching runs out of memory")

    g = p.add_argument_group("subject training (DreamBooth-style; the names of diffusers' DreamBooth scripts)")
    g.add_argument("--instance_data_dir", default=None, help="a folder of images of one subject, without captions (instead of --dataset)")
    g.add_argument("--instance_prompt", default=None, help='the caption of every instance image, e.g. "a photo of sks dog"')
    g.add_argument("--with_prior_preservation", action="store_true", help="also train on class examples, so that the class keeps its look")
    g.add_argument("--class_prompt", default=None, help='the class, e.g. "a photo of a dog"')
    g.add_argument("--class_data_dir", default=None, help="real class images (used first); missing ones are generated as image embeddings by the base prior")
    g.add_argument("--num_class_images", type=POSITIVE_INT, default=100, help="class examples to train with")
    g.add_argument("--prior_loss_weight", type=NON_NEGATIVE, default=1.0, help="weight of the class loss")


def add_optimisation_flags(p):
    """The optimiser, schedule, precision and speed options."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=seed_number(lambda message: note(message)), default=42, help="seed for data order, augmentation, noise and timesteps")
    g.add_argument("--train_batch_size", type=POSITIVE_INT, default=1, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    g.add_argument("--max_train_steps", type=POSITIVE_INT, default=None, help="optimiser steps; overrides --num_train_epochs")
    g.add_argument("--num_train_epochs", type=POSITIVE_INT, default=1)
    g.add_argument("--learning_rate", type=POSITIVE, default=1e-4)
    g.add_argument("--adam_weight_decay", type=NON_NEGATIVE, default=1e-2)
    g.add_argument("--adam_beta1", type=PROBABILITY, default=0.9)
    g.add_argument("--adam_beta2", type=PROBABILITY, default=0.999)
    g.add_argument("--adam_epsilon", type=POSITIVE, default=1e-8)
    g.add_argument("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="gradient clipping; 0 = off")
    g.add_argument("--lr_scheduler", default="constant", choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=NON_NEGATIVE_INT, default=0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's setting under `accelerate launch` (its flag or config; `no` = fp32), fp16 for a plain python run on CUDA; always fp32 on a CPU")
    g.add_argument("--gradient_checkpointing", type=unit_fraction, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                   help="recompute activations in the backward pass: all blocks (no value), or this fraction of the prior's blocks, spread evenly "
                        "(e.g. 0.5: a point between speed and memory; README: Speed and memory)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--max_nonfinite_steps", type=POSITIVE_INT, default=5, help="stop after this many NaN/inf losses in a row (each is skipped)")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw8bit needs bitsandbytes, prodigy needs prodigyopt (use --learning_rate 1 with it)")
    g.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer adamw8bit (the diffusers examples' flag)")
    g.add_argument("--loss_weighting", default="none", choices=["none", "p2", "min_snr"], help="p2: the original authors' 1/(1+SNR); min_snr: min(SNR, gamma)/SNR (Hang et al. 2023)")
    g.add_argument("--snr_gamma", type=POSITIVE, default=5.0, help="gamma of --loss_weighting min_snr")
    g.add_argument("--noise_offset", type=NON_NEGATIVE, default=0.0, help="add offset * N(0,1) per sample and channel to the noise; 0 = off")
    g.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the LoRA weights, saved as pytorch_lora_weights_ema.safetensors")
    g.add_argument("--ema_decay", type=number(float, 0, 1, low_open=True, high_open=True), default=0.999)
    g.add_argument("--torch_compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="compile the prior's blocks one region at a time (torch.compile); MODE: default, reduce-overhead (CUDA graphs: fixed shapes) "
                        "or max-autotune; if compiling fails, a warning and eager mode")
    g.add_argument("--torch_compile_backend", default="inductor", help="torch.compile backend for --torch_compile (torch._dynamo.list_backends())")
    g.add_argument("--prior_dropout", type=PROBABILITY, default=None, help="dropout rate inside the prior while training (default: the model's config, 0.1)")


def add_output_flags(p):
    """Checkpoints, outputs, the hub, validation and logging."""
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output_dir", default="wuerstchen-prior-lora")
    g.add_argument("--checkpointing_steps", type=NON_NEGATIVE_INT, default=500, help="save a resumable checkpoint every N steps; 0 = never")
    g.add_argument("--checkpoints_total_limit", type=POSITIVE_INT, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder, or 'latest' in --output_dir")
    g.add_argument("--overwrite_output_dir", action="store_true", help="start a new run in an --output_dir that holds an earlier run of this trainer: "
                   "its files (LoRA, checkpoints, args.json, model card, validation images, logs) are deleted, with a listing, when training starts; "
                   "the embeddings cache and files this trainer did not write stay (without the flag such a run is refused)")
    g.add_argument("--discard_newer_checkpoints", action="store_true", help="with --resume_from_checkpoint an older checkpoint: delete the newer checkpoint-N folders in --output_dir (without it such a resume is refused)")
    g.add_argument("--push_to_hub", action="store_true", help="when training ends, upload the LoRA (and EMA LoRA), the model card and its pictures, training_info.json and args.json, "
                   "never checkpoints, the embeddings cache or logs; the login and the hub are checked at the start: log in with `hf auth login` first")
    g.add_argument("--hub_model_id", default=None, help="hub repo for --push_to_hub (default: the --output_dir folder's name)")
    g.add_argument("--hub_token", default=None, help="a token for the upload only, never written anywhere; prefer HF_TOKEN or `hf auth login`")

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompts", "--validation_prompt", dest="validation_prompts", nargs="+", default=None, help="prompts rendered with the LoRA attached")
    g.add_argument("--validation_steps", type=POSITIVE_INT, default=None, help="render the validation prompts every N steps (and at the end); default 100")
    g.add_argument("--validation_epochs", type=POSITIVE_INT, default=None, help="instead of --validation_steps: every N epochs (the diffusers example's flag)")
    g.add_argument("--validation_split", type=PROBABILITY, default=0.0, help="hold out this fraction of the dataset for a validation loss (fixed noise and timesteps)")
    g.add_argument("--validation_dataset", default=None, help="a separate held-out dataset (same formats as --dataset) for the validation loss")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "comet_ml", "all", "none"], help="all: every tracker that is installed")
    g.add_argument("--tracker_project_name", default="wuerstchen-prior-lora", help="the project name the trackers log under")
    g.add_argument("--local_rank", type=int, default=-1, help="accepted for older launchers and ignored: the process's place comes from the environment accelerate sets")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--logging_steps", type=POSITIVE_INT, default=10, help="read losses back from the GPU every N steps (every step is still logged); the only wait for the GPU between checkpoints")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default that says something: "(default: 768)" after the help text,
    unless the text names its default already; switches (off by default) and open defaults (None:
    detected or resolved, as the text says) go without."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or isinstance(default, bool) or default == "" or default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


# Help texts for the flags defined without one (kept here so that the flag definitions stay as they are).
MORE_HELP = {
    "lora_dropout": "dropout on the LoRA branch's input while training",
    "dataloader_num_workers": "worker processes that decode images (the uncached path and cache building); 0 = in the main process",
    "gradient_accumulation_steps": "micro-batches per optimiser step",
    "num_train_epochs": "passes over the data (with kohya's repeat folders and --repeats, an epoch holds every repeat); --max_train_steps overrides it",
    "learning_rate": "AdamW's learning rate (1 with --optimizer prodigy)",
    "adam_weight_decay": "AdamW's decoupled weight decay",
    "adam_beta1": "AdamW's first-moment decay",
    "adam_beta2": "AdamW's second-moment decay",
    "adam_epsilon": "AdamW's epsilon",
    "lr_scheduler": "the learning-rate schedule over the run (diffusers' get_scheduler)",
    "lr_warmup_steps": "steps of linear warm-up (not with constant: use constant_with_warmup)",
    "ema_decay": "the EMA's decay (with --use_ema; ramps up to it)",
    "output_dir": "where the LoRA, model card, checkpoints and logs go",
}
USAGE = "%(prog)s --dataset DATA --output_dir DIR [options]   (or --instance_data_dir DIR --instance_prompt TEXT; -h lists every option)"


def make_parser():
    """The training flags, with help (a line and its default for every option)."""
    p = ArgumentParser(description="Train a LoRA adapter on the Wuerstchen v2 prior (Stage C) and write pytorch_lora_weights.safetensors.", allow_abbrev=False,
                       formatter_class=HelpFormatter, usage=USAGE)
    for add_flags in (add_model_flags, add_data_flags, add_optimisation_flags, add_output_flags):
        add_flags(p)
    short_metavars(p)
    return p


PATH_WORDS = ("dir", "path", "dataset", "checkpoint", "output", "model", "encoder", "file")


def short_metavars(p):
    """Help texts from MORE_HELP where a flag has none, and short value names (N, X, PATH, TEXT)
    instead of argparse's upper-cased flag names: --help lines stay short."""
    for action in p._actions:
        if not action.help and action.dest in MORE_HELP:
            action.help = MORE_HELP[action.dest]
        if action.metavar is not None or action.choices is not None or action.nargs == 0:
            continue
        kind = getattr(action.type, "__name__", None)
        if kind == "int":
            action.metavar = "N"
        elif kind == "float":
            action.metavar = "X"
        elif any(word in action.dest for word in PATH_WORDS):
            action.metavar = "PATH"
        else:
            action.metavar = "TEXT"


def parse_args(argv=None):
    """The command line as a frozen TrainConfig (config.py), checked and resolved."""
    p = make_parser()
    if argv is None:
        argv = sys.argv[1:]
        hide_hub_token()
    argv = attach_negative_numbers(p, argv)
    given = {a.dest for a in p._actions for s in a.option_strings for word in argv if word == s or word.startswith(s + "=")}
    return build_config(p.parse_args(argv), given)


def hide_hub_token():
    """Take --hub_token's value out of sys.argv once it is read, so that nothing later in this
    process prints or records it (trackers log sys.argv, tracebacks show it). The launcher that
    started the process (accelerate launch) and the process list still have it: HF_TOKEN, or the
    token file `hf auth login` writes, never show anywhere."""
    args = sys.argv
    for i, word in enumerate(args):
        if word == "--hub_token" and i + 1 < len(args):
            args[i + 1] = "***"
        elif word.startswith("--hub_token="):
            args[i] = "--hub_token=***"


def attach_negative_numbers(parser, argv):
    """`--learning_rate -1e-4` as `--learning_rate=-1e-4`, for every int and float flag.

    argparse reads a value that starts with '-' as an option unless it looks like -1 or -0.5, so
    -1e-4, -1. or -inf would fail with "expected one argument". Attached, the value reaches its
    argparse type, which says what is wrong with it."""
    numeric = {s for a in parser._actions if (a.type in (int, float) or getattr(a.type, "numeric", False)) for s in a.option_strings}
    argv, out, i = list(sys.argv[1:] if argv is None else argv), [], 0
    while i < len(argv):
        if argv[i] == "--":
            out += argv[i:]
            break
        if argv[i] in numeric and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


def warn(message):
    """A one-line `warning: ...` on stderr, from the main process only (before accelerate exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def note(message):
    """A `note: ...` line on stdout, from the main process only (before accelerate exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def inside(path, folder):
    """Whether `path` is `folder` or lies under it (symlinks resolved; `path` need not exist yet)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def dangling_link(path, itself=True):
    """The first part of `path` (itself, unless itself=False, or a folder above it) that is a
    symbolic link to nothing, with where it points; None when there is none. os.makedirs on such a
    path fails with a bare "File exists"."""
    part = os.path.abspath(path)
    part = part if itself else os.path.dirname(part)
    parts = []
    while True:
        parts.append(part)
        parent = os.path.dirname(part)
        if parent == part:
            break
        part = parent
    for part in reversed(parts):
        if os.path.islink(part) and not os.path.exists(part):
            return part, os.readlink(part)
        if not os.path.exists(part):
            return None
    return None


def refuse_dangling_link(flag, path, itself=True):
    found = dangling_link(path, itself)
    if found:
        link, target = found
        where = "is" if link == os.path.abspath(path) else f"lies under {link}, which is"
        raise UserError(f"{flag} {path} {where} a symbolic link to {target}, which does not exist (a dangling link); "
                        "create that folder, remove or re-point the link, or choose another path")


def read_prior_config(path, revision=None, download=False):
    """The prior's config.json as a dict before any model loads: from a local folder, the hub cache,
    or (download=True) the hub; None when it cannot be had."""
    import json

    if os.path.isdir(path):
        file = os.path.join(path, "prior", "config.json")
    else:
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            if download:
                file = hf_hub_download(path, "config.json", subfolder="prior", revision=revision)
            else:
                file = try_to_load_from_cache(path, "prior/config.json", revision=revision)
        except Exception:  # offline, no such repo, a malformed id: the models' loading reports it
            return None
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, TypeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_lora_rank(rank, targets, config):
    """--rank against the width (the smaller side) of each adapted Linear layer, read from the
    prior's config. A rank above a layer's width cannot raise the rank of its update, only add
    parameters: an error when that holds for every adapted layer (nothing is low-rank any more: a
    typo, or a setting for another model), a warning when only some layers are narrower (the
    all-linear timestep mapper, c_r wide, at a rank that suits the attention layers)."""
    if not config or not all(isinstance(config.get(k), int) for k in ("c", "c_cond", "c_r")):
        return
    c, c_cond, c_r = config["c"], config["c_cond"], config["c_r"]
    widths = {"to_q": c, "to_k": c, "to_v": c, "to_out.0": c, "channelwise.0": c, "channelwise.4": c,
              "kv_mapper.1": min(c_cond, c), "mapper": min(c_r, 2 * c), "cond_mapper.0": min(c_cond, c), "cond_mapper.2": c}
    adapted = {t: w for t in targets for name, w in widths.items() if t == name or t.endswith("." + name)}
    narrow = sorted(t for t, w in adapted.items() if rank > w)
    if not narrow:
        return
    widest = max(adapted.values())
    if len(narrow) == len(adapted):
        raise UserError(f"--rank {rank} is larger than every adapted layer is wide (at most {widest} features, prior config c={c}): "
                        f"the update cannot exceed rank {widest}, the extra rank only adds parameters; use --rank {widest} or less")
    warn(f"--rank {rank} is larger than {', '.join(f'{t} ({adapted[t]} wide)' for t in narrow)}: "
         "those layers' updates stay at their width, the extra rank there only adds parameters")


def prior_layer_names(config):
    """The names of the prior's Linear and Conv2d layers (what a LoRA can adapt), from its config:
    `depth` times a ResBlock, a TimestepBlock and an AttnBlock, with the input, condition and output
    layers around them (checked against the model built from the config in the tests). None when
    the config does not say."""
    depth = (config or {}).get("depth")
    if not isinstance(depth, int) or depth < 1:
        return None
    names = ["projection", "cond_mapper.0", "cond_mapper.2", "out.1"]
    for i in range(depth):
        res, timestep, attn = 3 * i, 3 * i + 1, 3 * i + 2
        names += [f"blocks.{res}.depthwise", f"blocks.{res}.channelwise.0", f"blocks.{res}.channelwise.4", f"blocks.{timestep}.mapper",
                  f"blocks.{attn}.kv_mapper.1"] + [f"blocks.{attn}.attention.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
    return names


def check_lora_targets(targets, config, flag="--lora_target_modules"):
    """Every target module names a layer of the prior, matched as peft matches a list (the name
    itself or its ending after a dot), before any model loads. peft refuses only when no name
    matches, after the models have loaded, and drops an unknown name beside known ones silently."""
    names = prior_layer_names(config)
    if names is None:
        return
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        endings = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n for n in names})
        raise UserError(f"{flag}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not the name of any layer of this prior "
                        f"(LoRA adapts its Linear and Conv2d layers: {', '.join(endings)}; e.g. blocks.2.attention.to_q); "
                        "use those names, or --lora_targets attn|attn-mlp|all-linear")


def build_config(ns, given=()):
    """Check the parsed flags across each other and resolve what they leave open (alpha, targets,
    optimiser, precision, compilation, hub repo), then freeze them into a TrainConfig. `given`: the
    flags typed on the command line (a warm start's file must agree with those). Nothing heavy loads
    here; ranges of single flags were checked by their argparse types (number())."""
    from wuerstchen_lora.config import from_values

    v = vars(ns).copy()
    v.pop("local_rank")  # older launchers pass it; the environment accelerate sets decides
    check_data_flags(v)
    resolve_lora_flags(v, given)
    check_magnitudes(v)
    check_output_flags(v)
    resolve_optimiser_flags(v)
    if v["push_to_hub"] and not v["hub_model_id"]:
        v["hub_model_id"] = os.path.basename(os.path.abspath(v["output_dir"]))
    check_tracker(v["report_to"])
    if v["hub_token"]:
        warn("--hub_token is used for the upload only and never written anywhere, but it shows in your shell history and process list (and in accelerate launch's traceback when a run fails); "
             "prefer HF_TOKEN or the token file `hf auth login` writes")
    if v["validation_epochs"] and v["validation_steps"]:
        raise UserError("--validation_steps and --validation_epochs both say how often to validate; give one")
    if not v["validation_epochs"] and not v["validation_steps"]:
        v["validation_steps"] = 100
    check_sizes(v)
    return from_values(v)


# Far past any value that trains (each is finite and positive, so the argparse types let it through):
# a run with them skips every step or writes overflowing weights, then ends with status 0.
MAX_LORA_SCALE = 1000.0  # alpha / rank (alpha / sqrt(rank) with --use_rslora); 1-4 is usual
MAX_LEARNING_RATE = 10.0  # AdamW trains at 1e-5..1e-3; Prodigy is run at 1
MAX_NOISE_OFFSET = 1.0  # a share of the unit-variance noise; 0.05-0.1 is usual


def check_magnitudes(v):
    """Absurd magnitudes, refused before anything loads."""
    scale = v["lora_alpha"] / (math.sqrt(v["rank"]) if v["use_rslora"] else v["rank"])
    if scale > MAX_LORA_SCALE:
        where = " (from --init_lora's file)" if v["init_lora"] else ""
        raise UserError(f"--lora_alpha {v['lora_alpha']:g}{where} with --rank {v['rank']} scales the LoRA by {scale:g}, more than {MAX_LORA_SCALE:g}: "
                        f"its output overflows and nothing trains; use an alpha near the rank (e.g. --lora_alpha {v['rank']})")
    if v["learning_rate"] > MAX_LEARNING_RATE:
        raise UserError(f"--learning_rate {v['learning_rate']:g} is above {MAX_LEARNING_RATE:g}: the weights diverge at once; "
                        "use 1e-4 (AdamW; 1 with --optimizer prodigy)")
    if v["noise_offset"] > MAX_NOISE_OFFSET:
        raise UserError(f"--noise_offset {v['noise_offset']:g} is above {MAX_NOISE_OFFSET:g} (a share of the unit-variance noise): "
                        "the loss overflows and every step is skipped; use 0.05-0.1, or 0 (off)")


def check_tracker(report_to):
    """accelerate drops a tracker whose package is missing without a word: say so."""
    import importlib.util

    package = {"wandb": "wandb", "comet_ml": "comet_ml"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        warn(f"--report_to {report_to}: {package} is not installed, so nothing is logged there; pip install {package} (or --report_to tensorboard)")


def check_data_flags(v):
    ext = v["caption_extension"].strip()
    if not ext.lstrip(".") or "/" in ext or os.sep in ext:
        raise UserError(f"--caption_extension {v['caption_extension']!r} is not a file extension; give one like .txt or .caption")
    v["caption_extension"] = ext if ext.startswith(".") else "." + ext
    if v["caption_from"] and v["instance_data_dir"]:
        raise UserError("--caption_from names the captions of a --dataset folder; --instance_data_dir images all take --instance_prompt")
    if v["keep_tokens"] and not v["shuffle_tags"]:
        raise UserError("--keep_tokens N only means something with --shuffle_tags")
    if v["resolution"] % 32:
        raise UserError(f"--resolution {v['resolution']} is not a multiple of 32 (EfficientNet stride); use {max(32, round(v['resolution'] / 32) * 32)}")
    if v["dataset"] and v["instance_data_dir"]:
        raise UserError("--dataset and --instance_data_dir are two kinds of training data; give one")
    if v["instance_data_dir"] and not v["instance_prompt"]:
        raise UserError('--instance_data_dir needs --instance_prompt, the caption of every instance image, e.g. "a photo of sks dog"')
    if v["instance_prompt"] and not v["instance_data_dir"]:
        raise UserError("--instance_prompt needs --instance_data_dir, the folder of the subject's images")
    if v["with_prior_preservation"] and not v["class_prompt"]:
        raise UserError('--with_prior_preservation needs --class_prompt, e.g. "a photo of a dog"')
    if not v["with_prior_preservation"] and (v["class_prompt"] or v["class_data_dir"]):
        warn("--class_prompt and --class_data_dir are only used with --with_prior_preservation")
    if v["validation_split"] and v["validation_dataset"]:
        raise UserError("--validation_split excludes --validation_dataset: give one")
    if not (v["dataset"] or v["instance_data_dir"]):
        raise UserError("--dataset is required: a hub dataset name, a local folder, or a .jsonl/.csv/.parquet file (or --instance_data_dir with --instance_prompt)")


def resolve_lora_flags(v, given):
    """--lora_alpha (the rank), --lora_target_modules (the preset), or all three from --init_lora's file."""
    if v["init_lora"]:
        from wuerstchen_lora.warmstart import check_init_lora_settings, read_init_lora

        _, settings = read_init_lora(v["init_lora"])
        flags = {"rank": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules", "use_dora": "use_dora", "use_rslora": "use_rslora"}
        chosen = {key: v[flag] for flag, key in flags.items() if flag in given}
        if "lora_target_modules" in given and isinstance(v["lora_target_modules"], str):
            chosen["target_modules"] = sorted(m.strip() for m in v["lora_target_modules"].split(",") if m.strip())
        elif "lora_targets" in given:  # a preset must agree with the file's modules as well
            chosen["target_modules"] = sorted(LORA_TARGET_PRESETS[v["lora_targets"]])
        check_init_lora_settings(settings, chosen)
        v.update(rank=settings["r"], lora_alpha=float(settings["lora_alpha"]), lora_target_modules=list(settings["target_modules"]),
                 use_dora=bool(settings.get("use_dora")), use_rslora=bool(settings.get("use_rslora")))
    if v["lora_alpha"] is None:
        v["lora_alpha"] = float(v["rank"])
    if v["lora_target_modules"] is None:
        v["lora_target_modules"] = list(LORA_TARGET_PRESETS[v["lora_targets"]])
    elif isinstance(v["lora_target_modules"], str):
        v["lora_target_modules"] = [m.strip() for m in v["lora_target_modules"].split(",") if m.strip()]
        if not v["lora_target_modules"]:
            raise UserError("--lora_target_modules is empty; leave it out to use --lora_targets (default: attention projections)")
    config = read_prior_config(v["pretrained_prior_model_name_or_path"], v["revision"])
    check_lora_targets(v["lora_target_modules"], config)
    check_lora_rank(v["rank"], v["lora_target_modules"], config)


def check_output_flags(v):
    from wuerstchen_lora.guard import resume_path

    if os.path.isfile(v["output_dir"]):
        raise UserError(f"--output_dir {v['output_dir']} is a file; give a folder")
    for flag in ("output_dir", "embeddings_cache_dir"):
        if v[flag]:
            refuse_dangling_link(f"--{flag}", v[flag])
    for data_flag in ("dataset", "instance_data_dir", "class_data_dir", "validation_dataset"):
        folder = v[data_flag]
        for out_flag in ("output_dir", "embeddings_cache_dir"):
            out = v[out_flag]
            if folder and out and os.path.isdir(folder) and inside(out, folder):
                raise UserError(f"--{out_flag} {out} is inside --{data_flag} {folder}: what a run writes there (validation images, "
                                "checkpoints, the cache) would be read as data by the next run; put it outside the dataset folder")
    if v["overwrite_output_dir"] and v["resume_from_checkpoint"]:
        raise UserError("--overwrite_output_dir starts a new run (it deletes the earlier one's files); it does not go with --resume_from_checkpoint: give one")
    resume_path(v["output_dir"], v["resume_from_checkpoint"], v["discard_newer_checkpoints"], tell=note)  # refused before anything is written


def resolve_optimiser_flags(v):
    """--use_8bit_adam into --optimizer; precision and compilation from accelerate's settings."""
    if v.pop("use_8bit_adam"):
        if v["optimizer"] not in ("adamw", "adamw8bit"):
            raise UserError(f"--use_8bit_adam conflicts with --optimizer {v['optimizer']}; keep one")
        v["optimizer"] = "adamw8bit"
    optional = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}
    if v["optimizer"] in optional:
        module, package = optional[v["optimizer"]]
        try:
            __import__(module)
        except ImportError as e:
            raise UserError(f"--optimizer {v['optimizer']} needs {package}: pip install {package} (or use --optimizer adamw)") from e
    if v["lr_warmup_steps"] and v["lr_scheduler"] == "constant":
        warn(f"--lr_warmup_steps {v['lr_warmup_steps']} does nothing with --lr_scheduler constant (the default); use --lr_scheduler constant_with_warmup")
    elif v["max_train_steps"] and v["lr_warmup_steps"] >= v["max_train_steps"]:
        warn(f"--lr_warmup_steps {v['lr_warmup_steps']} is not shorter than the run ({v['max_train_steps']} steps): "
             f"the learning rate never reaches --learning_rate {v['learning_rate']:g}")
    v["mixed_precision"], notice = resolve_mixed_precision(v["mixed_precision"])
    if notice:
        note(notice)
    launcher_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if launcher_backend not in ("no", "") and not v["torch_compile"]:
        # An accelerate config that asks for torch.compile gets it the way that works here (compile_blocks).
        v["torch_compile"], v["torch_compile_backend"] = os.environ.get("ACCELERATE_DYNAMO_MODE") or "default", launcher_backend
        note(f"note: the accelerate config's dynamo_backend {launcher_backend} is applied block by block, as --torch_compile {v['torch_compile']}")
    if v["torch_compile"]:
        check_compile_backend(v["torch_compile_backend"], v["torch_compile"])


def resolve_mixed_precision(requested):
    """Returns (mode, notice). The flag wins; then accelerate's own setting, which `accelerate
    launch` exports from its flag or config file (an explicit `no` included); fp16 on CUDA only
    for a plain `python` run, which has no accelerate setting."""
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    mode = requested or (launcher if launcher in ("no", "fp16", "bf16") else None) or ("no" if on_cpu else "fp16")
    if on_cpu and mode != "no":
        return "no", f"note: no GPU in use, so training runs in fp32 (--mixed_precision {mode} needs CUDA)"
    if not on_cpu and mode == "no" and not requested:
        return mode, "note: accelerate's mixed precision is `no`: training runs in fp32; pass --mixed_precision bf16 for speed"
    return mode, None


def check_compile_backend(backend, mode):
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"--torch_compile_backend {backend}: unknown; choose one of {', '.join(torch._dynamo.list_backends())}")
    if mode != "default" and backend != "inductor":
        raise UserError(f"--torch_compile {mode} is an inductor mode; use it with --torch_compile_backend inductor")


# ----------------------------------------------------------------------------------------------
# Sizes that cannot fit: refused with the estimate and the fix before anything is allocated


def machine_memory():
    """Bytes of RAM this process can have: the machine's, or its cgroup's limit when lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                ram = min(ram, int(f.read().strip()))
        except (OSError, ValueError):  # no cgroup file, or "max"
            pass
    return ram


def gpu_memory(index=None):
    """Bytes of memory of CUDA GPU `index` (default: this process's, LOCAL_RANK); None without one."""
    try:
        if not torch.cuda.is_available():
            return None
        index = int(os.environ.get("LOCAL_RANK", 0)) if index is None else index
        return torch.cuda.get_device_properties(index % torch.cuda.device_count()).total_memory
    except Exception:  # a driver that answers is_available but not the properties
        return None


def size_text(n):
    """Bytes for a message: 1.5 GiB, 9.8 TiB, 340 MiB."""
    if n >= 2**70:
        return f"{n / 2**60:.3g} EiB"
    for unit, scale in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB" if n >= 2**10 else f"{n} bytes"


def refuse_size(what, need, have, where, fix):
    """A UserError when `need` bytes (a lower bound) exceed the `have` bytes of `where`."""
    if have is not None and need > have:
        raise UserError(f"{what} needs at least {size_text(need)}, more than the {size_text(have)} of {where}; {fix}")


# A worker process of the DataLoader: a Python with torch and the dataset loaded, never less than this.
WORKER_BYTES = 100 * 2**20
# One sample of an epoch's shuffled order: torch.randperm's int64 and the Python int and list slot of .tolist().
ORDER_BYTES_PER_SAMPLE = 8 + 8 + 32
# The shipped prior's config (REFERENCE.md), for the estimates when the config cannot be read yet.
SHIPPED_PRIOR = {"c_in": 16, "c": 1536, "c_cond": 1280, "depth": 32}


def check_epoch_size(rows, repeats):
    """An epoch of rows x --repeats samples must fit its shuffled order in RAM (the sampler builds it
    whole at the start of every epoch)."""
    need = rows * repeats * ORDER_BYTES_PER_SAMPLE
    fit = max(1, machine_memory() // (rows * ORDER_BYTES_PER_SAMPLE))
    refuse_size(f"--repeats {repeats}: an epoch of {rows} rows x {repeats} repeats = {rows * repeats:,} samples, whose shuffled order",
                need, machine_memory(), "this machine's memory", f"use --repeats {min(fit, repeats - 1)} or less (more passes: --num_train_epochs or --max_train_steps)")


def check_sizes(v):
    """Sizes no machine here can hold, refused before anything loads: the micro-batch on the
    training device, the cache's encoding batch, an epoch's order, the class examples, the loader's
    workers. Each estimate is a lower bound (the prior's block inputs kept for the backward pass,
    the images' pixels), so what is refused could never run; what passes may still run out of memory."""
    config = {**SHIPPED_PRIOR, **{k: x for k, x in (read_prior_config(v["pretrained_prior_model_name_or_path"], v["revision"]) or {}).items()
                                   if k in SHIPPED_PRIOR and isinstance(x, int) and x > 0}}
    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
    ram = machine_memory()
    res = v["resolution"]
    act = 2 if v["mixed_precision"] in ("fp16", "bf16") else 4  # bytes of one activation
    grid = (res // 32) ** 2
    pixels = 3 * res * res * 4 + 6 * res * res * act  # the fp32 image and EfficientNet's first feature map (24 channels at stride 2)

    def device():
        gpu = gpu_memory() if on_gpu else None
        return (gpu, "the GPU's memory") if gpu else (ram, "this machine's memory")

    per_sample = 3 * config["depth"] * config["c"] * grid * act + 77 * config["c_cond"] * act
    if not v["cache_embeddings"]:
        per_sample += pixels
    batch = v["train_batch_size"]
    if batch * per_sample > 2**30:
        have, where = device()
        refuse_size(f"--resolution {res}: one training sample (the prior's block inputs for the backward pass)", per_sample, have, where,
                    "use --resolution 768 (it matches 1024 px output) or lower")
        refuse_size(f"--train_batch_size {batch} at --resolution {res}: one micro-batch (the prior's block inputs for the backward pass, about "
                    f"{size_text(per_sample)} a sample)", batch * per_sample, have, where,
                    f"use --train_batch_size {have // per_sample} or less, with --gradient_accumulation_steps for a larger effective batch")
    if v["cache_embeddings"] and v["cache_batch_size"] * pixels > 2**30:
        have, where = device()
        refuse_size(f"--cache_batch_size {v['cache_batch_size']} at --resolution {res}: one encoding batch (about {size_text(pixels)} an image)",
                    v["cache_batch_size"] * pixels, have, where, f"use --cache_batch_size {max(1, have // pixels)} or less (the cache is the same at any batch size)")
    if v["repeats"] * ORDER_BYTES_PER_SAMPLE > 2**30:  # every dataset has at least one row
        check_epoch_size(1, v["repeats"])
    if v["with_prior_preservation"]:
        per_class = config["c_in"] * grid * 4
        refuse_size(f"--num_class_images {v['num_class_images']} at --resolution {res}: the class examples, held in memory (about {size_text(per_class)} each)",
                    v["num_class_images"] * per_class, ram, "this machine's memory", f"use --num_class_images {max(1, ram // per_class)} or less (100-200 is usual)")
    workers = v["dataloader_num_workers"]
    refuse_size(f"--dataloader_num_workers {workers}: that many worker processes (each a Python with torch, at least {size_text(WORKER_BYTES)})",
                workers * WORKER_BYTES, ram, "this machine's memory", f"use --dataloader_num_workers {min(workers - 1, ram // WORKER_BYTES, os.cpu_count() or 1)} or less (the CPU count at most)")
