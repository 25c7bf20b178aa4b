"""Inference: the prior with a trained LoRA, then the decoder. The usage page is the docstring of
infer.py, the script that runs `main`."""

import contextlib
import fractions
import importlib.util
import os
import re
import sys

import torch

from wuerstchen_lora.flags import (
    POSITIVE_INT,
    SEED_LIMIT,
    ArgumentParser,
    HelpFormatter,
    attach_negative_numbers,
    gpu_memory,
    machine_memory,
    number,
    refuse_dangling_link,
    refuse_size,
    seed_number,
    short_metavars,
    size_text,
)
from wuerstchen_lora.hub import resolve_lora_spec
from wuerstchen_lora.models import (
    ADAPTER_NAME,
    DEFAULT_DECODER,
    DEFAULT_PRIOR,
    DEFAULT_STAGE_C_TIMESTEPS,
    LORA_WEIGHTS_NAME,
    TRAINING_INFO_NAME,
    UserError,
    build_prior_pipeline,
    check_lora_file,
    generate_images,
    image_formats,
    load_decoder_pipeline,
    load_lora_checked,
    load_prior_components,
    output_size_for_training_resolution,
    quiet_library_logs,
    read_training_info,
    save_image,
    use_sdpa_attention,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_DECODER_STEPS = 1000  # the decoder's scheduler is continuous in t; past this more steps only take longer
MAX_SCALE = 1000.0  # --lora_scale and the guidance scales: far past any useful value (4 is usual), short of fp16's overflow
MAX_PRIOR_STEPS = 1000  # likewise for the prior's scheduler
DEFAULT_SIZE = 1024  # without a training resolution to go by: the size the released model was trained for


def note(message):
    """A `note: ...` line on stderr (stdout carries the paths of the images written)."""
    print(message, file=sys.stderr)


# Help texts for the flags defined without one.
INFER_HELP = {
    "negative_prompt": "what the prior steers away from (with --prior_guidance_scale above 1)",
    "prior_guidance_scale": "classifier-free guidance of the prior (the LoRA's model); 1 = none",
    "decoder_steps": "denoising steps of the decoder (stage B)",
    "decoder_guidance_scale": "classifier-free guidance of the decoder; 0 = none",
}


def parse_args(argv=None):
    p = ArgumentParser(description="Generate images with a trained Wuerstchen prior LoRA: prior + LoRA -> decoder -> image files.", allow_abbrev=False,
                       formatter_class=HelpFormatter, usage="%(prog)s --checkpoint LORA --prompt TEXT [options]   (-h lists every option)")
    p.add_argument("--checkpoint", required=True, help="training output folder, a checkpoint-N folder, the .safetensors file, or a hub repo id (user/repo) holding " + LORA_WEIGHTS_NAME + " (a local path that exists wins)")
    p.add_argument("--revision", default=None, help="with a hub repo --checkpoint: the branch, tag or commit (default: main)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt")
    prompt.add_argument("--prompt_file", help="a text file with one prompt per line (blank lines ignored)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=POSITIVE_INT, default=1, help="images per prompt")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=None, help="images generated per call of the prior and decoder (GPU memory grows with it); default: all --num_images of a prompt at once")
    p.add_argument("--seed", type=seed_number(note), default=0, help=f"seed of the generator (reduced into [0, 2**{SEED_LIMIT.bit_length() - 1}) with a note)")
    size_help = ("output {} in px (multiple of 128); default: the size the LoRA's training resolution maps to "
                 f"(its {TRAINING_INFO_NAME}: 768 gives 1024, 96 gives 128), else {DEFAULT_SIZE}")
    p.add_argument("--height", type=number(int), default=None, help=size_help.format("height"))
    p.add_argument("--width", type=number(int), default=None, help=size_help.format("width"))
    p.add_argument("--prior_steps", type=number(int, 1, MAX_PRIOR_STEPS), default=None,
                   help=f"denoising steps of the prior (stage C), evenly spaced; default: the pipeline's tuned {len(DEFAULT_STAGE_C_TIMESTEPS) - 1}-step schedule (DEFAULT_STAGE_C_TIMESTEPS)")
    p.add_argument("--prior_guidance_scale", type=number(float, 0, MAX_SCALE), default=4.0)
    p.add_argument("--decoder_steps", type=number(int, 1, MAX_DECODER_STEPS), default=12)
    p.add_argument("--decoder_guidance_scale", type=number(float, 0, MAX_SCALE), default=0.0)
    p.add_argument("--lora_scale", type=number(float, -MAX_SCALE, MAX_SCALE), default=1.0, help="strength of the LoRA; 0 gives the base model (also for DoRA, whose magnitudes otherwise apply in full at any scale)")
    p.add_argument("--fuse_lora", action="store_true", help="merge the LoRA into the prior weights (same images, no extra latency)")
    p.add_argument("--prior_model", default=None, help="default: the base model the LoRA was trained on, else " + DEFAULT_PRIOR)
    p.add_argument("--decoder_model", default=None, help="default: the training metadata's decoder, else " + DEFAULT_DECODER)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--cpu_offload", action="store_true", help="keep each model on the CPU until its turn on the GPU (diffusers' enable_model_cpu_offload): less GPU memory, slower; needs CUDA and accelerate")
    p.add_argument("--output", default=None, help="image path: .png, .jpg/.jpeg or .webp (no extension: .png); several images get -0, -1, ... before the suffix. "
                   "Default: named after the prompt and seed, in the current folder (a-red-circle-s0.png; with --prompt_file, each prompt's own name). "
                   "PNG files hold the prompt, seed, LoRA and settings in their text chunks")
    p.add_argument("--overwrite", action="store_true", help="replace image files that exist already (else they are refused, before any model loads)")
    p.add_argument("--save_merged_prior", default=None, metavar="DIR", help="instead of generating: write the prior with the LoRA (times --lora_scale) merged in, loadable with WuerstchenPrior.from_pretrained")
    for action in p._actions:
        action.help = action.help or INFER_HELP.get(action.dest)
    short_metavars(p)
    args = p.parse_args(attach_negative_numbers(p, argv))
    if args.save_merged_prior:
        args.dtype = args.dtype or "fp32"  # merge at full precision unless told otherwise
    elif args.prompt is None and args.prompt_file is None:
        raise UserError("give --prompt or --prompt_file (or --save_merged_prior DIR to export a merged prior)")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is None:
            continue  # from the LoRA's training resolution, once its file is found (run)
        if value <= 0:
            raise UserError(f"--{side} {value}: the image size must be positive; give a multiple of 128 such as 1024")
        rounded = max(128, round(fractions.Fraction(value, 128)) * 128)  # exact for any whole number (a float overflows)
        if value != rounded:
            print(f"note: --{side} {value} is not a multiple of 128; using {rounded}", file=sys.stderr)
            setattr(args, side, rounded)
    if not args.save_merged_prior and args.output is not None:
        check_output_type(args.output)
        check_output_folder(args.output)
    if args.save_merged_prior:
        args.prompts = []
    elif args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"--prompt_file {args.prompt_file}: no such file")
        try:
            with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
                args.prompts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"--prompt_file {args.prompt_file}: cannot be read ({e.strerror or e}); give a readable text file") from e
        if not args.prompts:
            raise UserError(f"--prompt_file {args.prompt_file} holds no prompt")
    else:
        args.prompts = [args.prompt]
    args.device = check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.cpu_offload:
        check_cpu_offload(args)
    if not args.save_merged_prior and args.height is not None and args.width is not None:
        check_generation_size(args)  # again in run() once a size left open is known
    return args


def check_cpu_offload(args):
    """--cpu_offload moves each model to the GPU for its turn only (accelerate's hooks): refused
    before any model loads where there is no CUDA GPU or no accelerate."""
    if not args.device.startswith("cuda"):
        why = "no CUDA GPU is visible to torch here" if not torch.cuda.is_available() else f"--device {args.device} is not a CUDA GPU"
        raise UserError(f"--cpu_offload moves the models between the CPU and a CUDA GPU, but {why}; leave --cpu_offload out")
    if importlib.util.find_spec("accelerate") is None:
        raise UserError("--cpu_offload needs the accelerate package, which is not installed here; pip install accelerate, or leave --cpu_offload out")


def check_device(name):
    """--device as torch names it, refused before any model loads when torch does not know it or
    this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device name torch knows; use cpu, cuda, cuda:N or mps (or leave --device out)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible to torch here (torch.cuda.is_available() is False); "
                            "use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU{'s' * (count != 1)} (cuda:0 to cuda:{count - 1}); use one of those")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: Apple's MPS is not available here; use --device cpu, or leave --device out")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise UserError(f"--device {name}: torch cannot generate on a {device.type} device here; use cpu, cuda or mps (or leave --device out)")
    return str(device)


def device_memory(device):
    """(bytes, words) of the memory generation runs in: the GPU's, else this machine's RAM."""
    if device.startswith("cuda"):
        have = gpu_memory(torch.device(device).index or 0)
        if have:
            return have, f"the memory of {device}"
    return machine_memory(), "this machine's memory"


def check_generation_size(args):
    """Refuse, before any model loads, images that cannot fit: the decoder makes a batch of images
    (--batch_size, else all --num_images of a prompt) on the device, and every image is held in RAM
    until all are written. Lower bounds (the images' own pixels), so what is refused could never run."""
    n, pixels = min(args.batch_size or args.num_images, args.num_images), 3 * args.height * args.width
    element = 2 if args.dtype in ("fp16", "bf16") else 4
    have, where = device_memory(args.device)
    size = f"{args.height}x{args.width}"
    refuse_size(f"--height {args.height} --width {args.width}: one image", pixels * element, have, where,
                "use a smaller --height and --width (1024x1024 is the size the model was trained for)")
    fits = max(1, have // (pixels * element)) if have else 1
    flag, fix = ((f"--batch_size {n}", f"use --batch_size {fits} or less") if args.batch_size else
                 (f"--num_images {n}", f"use --num_images {fits} or less, and run again with another --seed for more, or --batch_size {fits} to make them {fits} at a time"))
    refuse_size(f"{flag} at {size}: the decoder's batch of {n:,} images (about {size_text(pixels * element)} each)", n * pixels * element, have, where, fix)
    count = args.num_images * len(args.prompts)
    refuse_size(f"--num_images {args.num_images} x {len(args.prompts)} prompt{'s' * (len(args.prompts) != 1)} at {size}: the {count:,} images, held until they are written",
                count * pixels, machine_memory(), "this machine's memory", "use a smaller --num_images, or split --prompt_file into several runs")


def check_output_folder(output):
    """--output's folder, checked before any model loads: a file where a folder must be is refused,
    and so is a folder this process cannot write in (tried with an empty file, removed at once).
    A folder that does not exist yet is made when the image is written."""
    refuse_dangling_link("--output", output, itself=False)  # a link as the file itself is replaced by the image
    folder = os.path.dirname(os.path.abspath(output))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output {output}: {existing} is a file, not a folder, so nothing can be written under it; choose another --output")
    probe = os.path.join(existing, f".tmp-probe-{os.urandom(6).hex()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise UserError(f"--output {output}: cannot write in {existing} ({e.strerror or e}); choose a folder you can write to") from e
    os.unlink(probe)


def training_info(lora_path):
    """The training_info.json beside the LoRA file (None without one), checked: a damaged file or one
    that is not the JSON object training writes is one error line, before any model loads."""
    path = os.path.join(os.path.dirname(os.path.abspath(lora_path)), TRAINING_INFO_NAME)
    fix = ("restore it from the training output, or move it away (the base models then come from --prior_model and --decoder_model, "
           f"else {DEFAULT_PRIOR} and {DEFAULT_DECODER})")
    try:
        info = read_training_info(lora_path)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not readable JSON ({str(e).splitlines()[0][:120]}); {fix}") from e
    if info is None:
        return None
    if not isinstance(info, dict):
        raise UserError(f"{path} holds a JSON {type(info).__name__}, not the object of settings training writes; {fix}")
    for key in ("base_model", "decoder_model", "revision"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise UserError(f"{path}: {key} is {info[key]!r}, not a model name; {fix}")
    return info


def resolve_lora_path(checkpoint, revision=None):
    """The local LoRA file: from a folder, the file itself, or a hub repo (downloaded or cached)."""
    return resolve_lora_spec(checkpoint, revision, flag="--checkpoint")


def check_output_type(output):
    """Refuse an --output whose extension names no image type this script writes (no extension: .png)."""
    if output.endswith(("/", os.sep)):
        raise UserError(f"--output {output} is a folder; give an image path such as {os.path.join(output, 'image.png')}")
    ext = os.path.splitext(output)[1]
    if ext and ext.lower() not in image_formats():
        raise UserError(f"--output {output}: unsupported image type {ext}; use {', '.join(image_formats())}")
    return output


def output_file(output):
    """The --output path to write, checked before any model loads: not a folder; no extension means .png."""
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; give an image path such as {os.path.join(output, 'image.png')}")
    return output if os.path.splitext(output)[1] else output + ".png"


def output_paths(output, n):
    """One image: the path as given; several: numbered, in prompt order (prompt 0's images first)."""
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def prompt_slug(prompt, limit=60):
    """A file name from a prompt: its words (letters and digits, any script) joined by '-', lower
    case, at most `limit` characters, cut at a word; 'image' when nothing is left."""
    words = re.findall(r"[^\W_]+", prompt.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + bool(slug) > limit:
            break
        slug += "-" * bool(slug) + word
    return slug or (words[0][:limit] if words else "image")


def default_paths(prompts, seed, n):
    """The names images get without --output, in the current folder: each prompt's slug and the seed
    (a-red-circle-s0.png), numbered -0, -1, ... for several images; a prompt whose slug an earlier
    one has already gets -2, -3, ... after its slug."""
    paths, stems = [], set()
    for prompt in prompts:
        slug, count = prompt_slug(prompt), 1
        stem = f"{slug}-s{seed}"
        while stem in stems:  # the same words again (or "a b" twice beside "a b 2")
            count += 1
            stem = f"{slug}-{count}-s{seed}"
        stems.add(stem)
        paths += [f"{stem}.png"] if n == 1 else [f"{stem}-{i}.png" for i in range(n)]
    return paths


def image_paths(args):
    """Every image's path, prompt by prompt, checked before any model loads: --output numbered, else
    the prompts' own names; a file there already is refused unless --overwrite."""
    if args.output is not None:
        paths = output_paths(output_file(args.output), args.num_images * len(args.prompts))
    else:
        paths = default_paths(args.prompts, args.seed, args.num_images)
        check_output_folder(paths[0])
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more of the {len(paths)} images' paths" if len(existing) > 1 else ""
        fix = "give another --output" if args.output is not None else "give --output PATH or another --seed"
        raise UserError(f"{existing[0]}{more} exist{'s' * (not more)} already; pass --overwrite to replace {'them' if more else 'it'}, or {fix}")
    for path in existing:
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, where an image would be written; give another --output")
    return paths


MODEL_FLAGS = {"prior": ("--prior_model", "base_model", DEFAULT_PRIOR), "decoder": ("--decoder_model", "decoder_model", DEFAULT_DECODER)}


def base_model(args, info, which):
    """(name, source) of the base prior or decoder: its flag, else the LoRA's training_info.json,
    else the hub default ("flag", "info" or "default")."""
    flag, key, default = MODEL_FLAGS[which]
    given = getattr(args, flag[2:])
    if given:
        return given, "flag"
    return (info[key], "info") if info.get(key) else (default, "default")


@contextlib.contextmanager
def base_model_errors(args, info, lora_path, which):
    """A base model that fails to load because it was guessed (no training_info.json beside the LoRA,
    as with the diffusers example's output): the error says so and names the two flags."""
    try:
        yield
    except UserError as e:
        name, source = base_model(args, info, which)
        if source != "default":
            raise
        from huggingface_hub import constants

        cause = e.__cause__ or e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:150]
        offline = "the hub is offline here (HF_HUB_OFFLINE=1) and it is not in the hub cache; " if constants.HF_HUB_OFFLINE else ""
        raise UserError(f"could not load the {which} {name} ({reason}): {lora_path} has no {TRAINING_INFO_NAME} beside it (a LoRA from another tool, "
                        f"such as the diffusers example), so the base models default to {DEFAULT_PRIOR} and {DEFAULT_DECODER}; {offline}"
                        "give --prior_model and --decoder_model: the models it was trained on, as hub ids or local folders") from e


def load_prior_pipeline(args, lora_path):
    """Prior pipeline with the LoRA loaded (checked) and scaled or fused."""
    info = training_info(lora_path) or {}
    dtype = DTYPES[args.dtype]
    prior_model, _ = base_model(args, info, "prior")
    with base_model_errors(args, info, lora_path, "prior"):
        prior, text_encoder, tokenizer, scheduler = load_prior_components(prior_model, None if args.prior_model else info.get("revision"))
    use_sdpa_attention(prior)
    offload = getattr(args, "cpu_offload", False)  # bench/world.py passes a namespace of its own, without it
    prior_pipeline = build_prior_pipeline(prior, text_encoder, tokenizer, scheduler).to("cpu" if offload else args.device, dtype=dtype)
    load_lora_checked(prior_pipeline, lora_path, adapter_name=ADAPTER_NAME)
    if args.lora_scale == 0:
        # Checked above, then removed: the base prior exactly. A DoRA adapter at scale 0 would still
        # rescale every adapted layer by its learned magnitudes (peft keeps applying them).
        prior_pipeline.unload_lora_weights()
        print("note: --lora_scale 0: the LoRA file was checked but is not applied; this is the base model", file=sys.stderr)
    else:
        if uses_dora(prior_pipeline.prior) and args.lora_scale != 1.0:
            print(f"note: DoRA adapter: --lora_scale {args.lora_scale:g} scales the learned direction change only; "
                  "its learned magnitudes apply in full at any scale other than 0", file=sys.stderr)
        if args.fuse_lora:
            prior_pipeline.fuse_lora(components=["prior"], lora_scale=args.lora_scale)
            # Drop the adapter wrappers too (the merged weights stay): a plain prior, no added latency.
            prior_pipeline.unload_lora_weights()
        elif args.lora_scale != 1.0:
            scale_lora(prior_pipeline, args.lora_scale)
    prior_pipeline.set_progress_bar_config(disable=True)
    if offload:
        prior_pipeline.enable_model_cpu_offload(gpu_id=torch.device(args.device).index or 0)
    return prior_pipeline


def uses_dora(prior):
    """Whether the adapter loaded into `prior` is DoRA (weight-decomposed: learned magnitudes)."""
    config = getattr(prior, "peft_config", {}).get(ADAPTER_NAME)
    return bool(getattr(config, "use_dora", False))


def scale_lora(prior_pipeline, scale):
    """Run the LoRA at `scale` times its trained strength."""
    try:
        prior_pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    except KeyError:  # diffusers before 0.38 registers no scale function for WuerstchenPrior: ask peft's layers
        from peft.tuners.lora import LoraLayer

        for module in prior_pipeline.prior.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)


def load_pipelines(args, lora_path):
    """Prior pipeline with the LoRA, and the decoder pipeline."""
    info = training_info(lora_path) or {}
    decoder_model, _ = base_model(args, info, "decoder")
    prior_pipeline = load_prior_pipeline(args, lora_path)
    with base_model_errors(args, info, lora_path, "decoder"):
        decoder_pipeline = load_decoder_pipeline(decoder_model, dtype=DTYPES[args.dtype], device="cpu" if args.cpu_offload else args.device)
    if args.cpu_offload:
        decoder_pipeline.enable_model_cpu_offload(gpu_id=torch.device(args.device).index or 0)
    return prior_pipeline, decoder_pipeline


def save_merged_prior(args, lora_path):
    """Merge the LoRA into the prior's weights, drop the adapter layers and save a plain prior
    (never into the base prior's own folder: checked before the models load)."""
    from wuerstchen_lora.outputs import check_merged_prior_target, write_merged_prior

    check_merged_prior_target(args.save_merged_prior, args.prior_model or (read_training_info(lora_path) or {}).get("base_model") or DEFAULT_PRIOR)
    args.fuse_lora = True
    prior_pipeline = load_prior_pipeline(args, lora_path)
    check_merged_weights(prior_pipeline.prior, args, lora_path)
    write_merged_prior(prior_pipeline.prior, args.save_merged_prior)
    print(args.save_merged_prior)
    return [args.save_merged_prior]


def note_long_prompts(tokenizer, prompts, negative_prompt=None):
    """One note line naming the prompts CLIP truncates (77 tokens, start and end tokens included)."""
    limit = tokenizer.model_max_length
    texts = [("the prompt" if len(prompts) == 1 else f"prompt {i + 1}", p) for i, p in enumerate(prompts)]
    texts += [("--negative_prompt", negative_prompt)] if negative_prompt else []
    long = [f"{name} ({n} tokens)" for name, text in texts if (n := len(tokenizer(text).input_ids)) > limit]
    if long:
        shown = ", ".join(long[:3]) + (f" and {len(long) - 3} more" if len(long) > 3 else "")
        print(f"note: {shown} {'is' if len(long) == 1 else 'are'} longer than CLIP's {limit} tokens: "
              f"truncated to the first {limit}", file=sys.stderr)
    return len(long)


def finite_embeddings_check(args, lora_path):
    """A check_embeddings for generate_images: the prior's image embeddings must be finite, else the
    decoder makes a black or noise image that would be written with status 0 (a LoRA whose values
    overflow, such as one scaled by 1e30, or too strong a --lora_scale). Refused before any image
    is decoded or written."""
    def check(prompt, embeddings):
        if not torch.isfinite(embeddings).all():
            bad = int((~torch.isfinite(embeddings)).sum())
            raise UserError(f"the prior's image embeddings for {prompt[:60]!r} hold {bad:,} NaN or inf values of {embeddings.numel():,} with the LoRA "
                            f"{lora_path} at --lora_scale {args.lora_scale:g} ({args.dtype}): its values overflow; no image was written. "
                            "Use a smaller --lora_scale, --dtype fp32 if it was fp16, or an earlier checkpoint-N of the run")
    return check


def check_merged_weights(prior, args, lora_path):
    """The merged prior must be finite before it is written (a LoRA whose values overflow)."""
    bad = sorted(n for n, p in prior.named_parameters() if not torch.isfinite(p).all())
    if bad:
        raise UserError(f"merging the LoRA {lora_path} at --lora_scale {args.lora_scale:g} gives {len(bad)} prior weights with NaN or inf values "
                        f"(e.g. {bad[0]}): its values overflow; nothing was written. Use a smaller --lora_scale or an earlier checkpoint-N of the run")


def run(args):
    quiet_library_logs()
    lora_path = resolve_lora_path(args.checkpoint, args.revision)
    check_lora_file(lora_path)  # before minutes of model loading
    info = training_info(lora_path) or {}  # likewise
    if args.save_merged_prior:
        return save_merged_prior(args, lora_path)
    note_base_models(args, info, lora_path)
    default_size(args, info)
    check_generation_size(args)
    paths = image_paths(args)
    prior_pipeline, decoder_pipeline = load_pipelines(args, lora_path)
    note_long_prompts(prior_pipeline.tokenizer, args.prompts, args.negative_prompt)
    images, batch = [], args.batch_size or args.num_images
    for prompt in args.prompts:
        # Each prompt from --seed: its images are the same when it is run alone (as the file name says).
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        for start in range(0, args.num_images, batch):
            images += generate_images(
                prior_pipeline,
                decoder_pipeline,
                [prompt],
                negative_prompt=args.negative_prompt,
                height=args.height,
                width=args.width,
                num_images_per_prompt=min(batch, args.num_images - start),
                prior_guidance_scale=args.prior_guidance_scale,
                prior_steps=args.prior_steps,
                decoder_steps=args.decoder_steps,
                decoder_guidance_scale=args.decoder_guidance_scale,
                generator=generator,
                check_embeddings=finite_embeddings_check(args, lora_path),
            )
    for i, (image, path) in enumerate(zip(images, paths)):
        save_image(image, path, image_text(args, info, args.prompts[i // args.num_images], i % args.num_images))
        print(path)
    return paths


def note_base_models(args, info, lora_path):
    """One note when a base model is the hub default because the LoRA has no training_info.json."""
    guessed = [f"{flag} {name}" for which, (flag, _, _) in MODEL_FLAGS.items() for name, source in [base_model(args, info, which)] if source == "default"]
    if guessed and not info:
        note(f"note: {lora_path} has no {TRAINING_INFO_NAME} beside it: using {' and '.join(guessed)} (the hub defaults); "
             "give --prior_model/--decoder_model if it was trained on others")


def default_size(args, info):
    """--height/--width left out: the size the LoRA's training resolution maps to (a note says so),
    else 1024."""
    if args.height is not None and args.width is not None:
        return
    resolution, size = info.get("resolution"), DEFAULT_SIZE
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0:
        size = output_size_for_training_resolution(resolution)
        if size != DEFAULT_SIZE:
            note(f"note: generating at {args.height or size}x{args.width or size}, the size the LoRA's training resolution {resolution} maps to "
                 f"({TRAINING_INFO_NAME}); give --height/--width for another")
    elif resolution is not None:
        note(f"note: {TRAINING_INFO_NAME}'s resolution {resolution!r} is not a size in px; generating at {DEFAULT_SIZE} px (give --height/--width)")
    args.height = args.height or size
    args.width = args.width or size


def image_text(args, info, prompt, index):
    """What a PNG's text chunks record: enough to make the image again. Keys as named here, plus
    'parameters', the one-string form other tools (AUTOMATIC1111's web UI and the sites that read it) show."""
    prior_steps = args.prior_steps or len(DEFAULT_STAGE_C_TIMESTEPS) - 1
    text = {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt or "",
        "seed": args.seed,
        "image_index": index,
        "num_images": args.num_images,
        "batch_size": args.batch_size or args.num_images,
        "lora": args.checkpoint,
        **({"lora_revision": args.revision} if args.revision else {}),
        "lora_scale": f"{args.lora_scale:g}",
        "size": f"{args.width}x{args.height}",
        "prior_steps": prior_steps if args.prior_steps else f"{prior_steps} (DEFAULT_STAGE_C_TIMESTEPS)",
        "decoder_steps": args.decoder_steps,
        "prior_guidance_scale": f"{args.prior_guidance_scale:g}",
        "decoder_guidance_scale": f"{args.decoder_guidance_scale:g}",
        "prior_model": base_model(args, info, "prior")[0],
        "decoder_model": base_model(args, info, "decoder")[0],
        "dtype": args.dtype,
        "software": "wuerstchen_lora infer.py",
    }
    text["parameters"] = (f"{prompt}\n" + (f"Negative prompt: {args.negative_prompt}\n" if args.negative_prompt else "")
                          + f"Steps: {prior_steps}, Decoder steps: {args.decoder_steps}, CFG scale: {args.prior_guidance_scale:g}, Seed: {args.seed}, "
                          f"Size: {args.width}x{args.height}, Model: {text['prior_model']}, Lora: {args.checkpoint}, Lora scale: {args.lora_scale:g}")
    return text


def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

