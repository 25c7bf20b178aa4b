"""Inference: the prior with a trained LoRA, then the decoder. The usage page is the docstring of
infer.py, the script that runs `main`."""

import fractions
import os
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
    quiet_library_logs,
    read_training_info,
    save_image,
    use_sdpa_attention,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_DECODER_STEPS = 1000  # the decoder's scheduler is continuous in t; past this more steps only take longer
MAX_SCALE = 1000.0  # --lora_scale and the guidance scales: far past any useful value (4 is usual), short of fp16's overflow


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
    p.add_argument("--num_images", type=POSITIVE_INT, default=1, help="images per prompt, generated as one batch")
    p.add_argument("--seed", type=seed_number(note), default=0, help=f"seed of the generator (reduced into [0, 2**{SEED_LIMIT.bit_length() - 1}) with a note)")
    p.add_argument("--height", type=number(int), default=1024, help="output height in px (multiple of 128)")
    p.add_argument("--width", type=number(int), default=1024, help="output width in px (multiple of 128)")
    p.add_argument("--prior_guidance_scale", type=number(float, 0, MAX_SCALE), default=4.0)
    p.add_argument("--decoder_steps", type=number(int, 1, MAX_DECODER_STEPS), default=12)
    p.add_argument("--decoder_guidance_scale", type=number(float, 0, MAX_SCALE), default=0.0)
    p.add_argument("--lora_scale", type=number(float, -MAX_SCALE, MAX_SCALE), default=1.0, help="strength of the LoRA; 0 gives the base model (also for DoRA, whose magnitudes otherwise apply in full at any scale)")
    p.add_argument("--fuse_lora", action="store_true", help="merge the LoRA into the prior weights (same images, no extra latency)")
    p.add_argument("--prior_model", default=None, help="default: the base model the LoRA was trained on, else " + DEFAULT_PRIOR)
    p.add_argument("--decoder_model", default=None, help="default: the training metadata's decoder, else " + DEFAULT_DECODER)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--output", default="demo.png", help="image path: .png, .jpg/.jpeg or .webp (no extension: .png); several images get -0, -1, ... before the suffix")
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
        if value <= 0:
            raise UserError(f"--{side} {value}: the image size must be positive; give a multiple of 128 such as 1024")
        rounded = max(128, round(fractions.Fraction(value, 128)) * 128)  # exact for any whole number (a float overflows)
        if value != rounded:
            print(f"note: --{side} {value} is not a multiple of 128; using {rounded}", file=sys.stderr)
            setattr(args, side, rounded)
    if not args.save_merged_prior:
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
    if not args.save_merged_prior:
        check_generation_size(args)
    return args


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
    """Refuse, before any model loads, images that cannot fit: the decoder makes all --num_images
    of a prompt as one batch on the device, and every image is held in RAM until it is written.
    Lower bounds (the images' own pixels), so what is refused could never run."""
    n, pixels = args.num_images, 3 * args.height * args.width
    element = 2 if args.dtype in ("fp16", "bf16") else 4
    have, where = device_memory(args.device)
    size = f"{args.height}x{args.width}"
    refuse_size(f"--height {args.height} --width {args.width}: one image", pixels * element, have, where,
                "use a smaller --height and --width (1024x1024 is the size the model was trained for)")
    refuse_size(f"--num_images {n} at {size}: the decoder's batch of {n:,} images (about {size_text(pixels * element)} each)", n * pixels * element, have, where,
                f"use --num_images {max(1, have // (pixels * element))} or less, and run again with another --seed for more")
    count = n * len(args.prompts)
    ram = machine_memory()
    refuse_size(f"--num_images {n} x {len(args.prompts)} prompt{'s' * (len(args.prompts) != 1)} at {size}: the {count:,} images, held until they are written",
                count * pixels, ram, "this machine's memory", "use a smaller --num_images, or split --prompt_file into several runs")


def check_output_folder(output):
    """--output's folder, checked before any model loads: a file where a folder must be is refused,
    and so is a folder this process cannot write in (tried with an empty file, removed at once).
    A folder that does not exist yet is made when the image is written."""
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


def load_prior_pipeline(args, lora_path):
    """Prior pipeline with the LoRA loaded (checked) and scaled or fused."""
    info = training_info(lora_path) or {}
    dtype = DTYPES[args.dtype]
    prior_model = args.prior_model or info.get("base_model") or DEFAULT_PRIOR
    prior, text_encoder, tokenizer, scheduler = load_prior_components(prior_model, None if args.prior_model else info.get("revision"))
    use_sdpa_attention(prior)
    prior_pipeline = build_prior_pipeline(prior, text_encoder, tokenizer, scheduler).to(args.device, dtype=dtype)
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
    decoder_model = args.decoder_model or info.get("decoder_model") or DEFAULT_DECODER
    return load_prior_pipeline(args, lora_path), load_decoder_pipeline(decoder_model, dtype=DTYPES[args.dtype], device=args.device)


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
    training_info(lora_path)  # likewise
    if args.save_merged_prior:
        return save_merged_prior(args, lora_path)
    args.output = output_file(args.output)
    prior_pipeline, decoder_pipeline = load_pipelines(args, lora_path)
    note_long_prompts(prior_pipeline.tokenizer, args.prompts, args.negative_prompt)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = generate_images(
        prior_pipeline,
        decoder_pipeline,
        args.prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        prior_guidance_scale=args.prior_guidance_scale,
        decoder_steps=args.decoder_steps,
        decoder_guidance_scale=args.decoder_guidance_scale,
        generator=generator,
        check_embeddings=finite_embeddings_check(args, lora_path),
    )
    paths = output_paths(args.output, len(images))
    for image, path in zip(images, paths):
        save_image(image, path)
        print(path)
    return paths


def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

