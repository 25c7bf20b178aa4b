"""Model parts of Wuerstchen v2 shared by the trainer and `infer.py`.

Loading each component on its own (rather than `WuerstchenPriorPipeline.from_pretrained`, which fails
on diffusers 0.42), the EfficientNet image encoder that no diffusers repo ships, the LoRA file
(writing, loading and checking that the prior really took it) and the one image-generation
function used both for validation during training and for inference.
"""

import contextlib
import json
import os
import pickle
import re
import tempfile

import torch
import torch.nn as nn
from diffusers import (
    DDPMWuerstchenScheduler,
    WuerstchenDecoderPipeline,
    WuerstchenPriorPipeline,
)
from safetensors import safe_open
from safetensors.torch import load_file

try:  # diffusers >= 0.38 moved the Wuerstchen models under `deprecated`
    from diffusers.pipelines.deprecated.wuerstchen import (
        DEFAULT_STAGE_C_TIMESTEPS,
        PaellaVQModel,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import (
        GlobalResponseNorm,
        WuerstchenLayerNorm,
    )
except ImportError:  # older releases
    from diffusers.pipelines.wuerstchen import (  # type: ignore[no-redef]
        DEFAULT_STAGE_C_TIMESTEPS,
        PaellaVQModel,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )

DEFAULT_PRIOR = "warp-ai/wuerstchen-prior"
DEFAULT_DECODER = "warp-ai/wuerstchen"
# The EfficientNet encoder is only published inside the original authors' Stage-B checkpoint.
DEFAULT_IMAGE_ENCODER_REPO = "dome272/wuerstchen"
DEFAULT_IMAGE_ENCODER_FILE = "model_v2_stage_b.pt"

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_INFO_NAME = "training_info.json"  # what infer.py reads: base models, resolution, LoRA config
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# `emb = (effnet(x) + 1) / 42`: the scaling the prior was trained with; the prior pipeline undoes it
# with `latent_mean` 42 and `latent_std` 1 (model_index.json of warp-ai/wuerstchen-prior).
EMBEDDING_SCALE = 42.0
EMBEDDING_SHIFT = 1.0
# EfficientNet input normalisation (ImageNet statistics), as in the original training code.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def quiet_library_logs():
    """diffusers/transformers chatter (deprecation notices, dtype hints) hides the lines that matter.

    Nothing is lost by it: the one warning that matters here, LoRA keys the prior skipped, is
    turned into an error by `load_lora_checked`.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars for every tiny load


class UserError(Exception):
    """A mistake the user can fix; the scripts print its message on one line and exit with status 2."""


def decided_on_main(accelerator, check, default=None):
    """Runs check() on the main process only (it reads or deletes shared files, or asks the hub)
    and makes its UserError every process's: the message is broadcast and all raise it, so no
    rank waits forever for a rank that stopped. Returns check()'s result on the main process and
    `default` on the others. accelerate has no helper for a shared refusal, hence this one."""
    result, message = default, None
    if accelerator.is_main_process:
        try:
            result = check()
        except UserError as e:
            message = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message:
        raise UserError(message)
    return result


# ----------------------------------------------------------------------------------------------
# Image encoder (Stage C's "EfficientNet" condition)


class EfficientNetEncoder(nn.Module):
    """torchvision's EfficientNetV2-S features followed by a 1x1 conv + BatchNorm to 16 channels.

    Same layout as the original Wuerstchen code, so the Stage-B checkpoint's `effnet_state_dict`
    loads with strict key matching. Output stride is 32: a 768 px image gives a 24x24 grid.
    """

    def __init__(self, c_latent=16):
        super().__init__()
        from torchvision.models import efficientnet_v2_s

        # weights=None: the ImageNet weights would be downloaded only to be overwritten.
        self.backbone = efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(nn.Conv2d(1280, c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent))

    def forward(self, x):
        return self.mapper(self.backbone(x))


def _read_encoder_state_dict(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "effnet_state_dict" in state:
            state = state["effnet_state_dict"]
        elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state
    raise UserError(f"--image_encoder {path}: unknown file type; give a .safetensors, .pt or .pth file")


def resolve_image_encoder_path(spec):
    """`spec` is a local file, or None for the original authors' Stage-B checkpoint on the hub."""
    if spec:
        if not os.path.isfile(spec):
            raise UserError(f"--image_encoder {spec}: no such file; give the path of a .safetensors/.pt file")
        return spec
    from huggingface_hub import hf_hub_download

    with model_load_errors(f"{DEFAULT_IMAGE_ENCODER_REPO}/{DEFAULT_IMAGE_ENCODER_FILE}", "image encoder"):
        return hf_hub_download(DEFAULT_IMAGE_ENCODER_REPO, DEFAULT_IMAGE_ENCODER_FILE)


def load_image_encoder(spec=None):
    path = resolve_image_encoder_path(spec)
    try:
        state = _read_encoder_state_dict(path)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:  # damaged, or a pickle with code in it
        raise UserError(f"--image_encoder {path}: cannot be read as weights ({str(e).splitlines()[0][:150]})") from e
    c_latent = state["mapper.0.weight"].shape[0] if "mapper.0.weight" in state else 16
    with torch.device("meta"):  # skip the random init: every weight is overwritten below
        encoder = EfficientNetEncoder(c_latent)
    missing, unexpected = encoder.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(
            f"--image_encoder {path}: not an EfficientNet encoder checkpoint "
            f"(missing {len(missing)} keys such as {missing[:2]}, unexpected {len(unexpected)} such as "
            f"{unexpected[:2]}); give model_v2_stage_b.pt or its effnet_state_dict"
        )
    return encoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Prior, text encoder, decoder


def load_prior_components(path, revision=None, tokenizer=None):
    """Prior, CLIP text encoder, tokenizer (unless one is given, already loaded from the same repo)
    and scheduler from a repo laid out like warp-ai/wuerstchen-prior."""
    from transformers import CLIPTextModel, CLIPTokenizer

    with model_load_errors(path, "prior"):
        prior = WuerstchenPrior.from_pretrained(path, subfolder="prior", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
        tokenizer = tokenizer or CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        scheduler = DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    return prior, text_encoder, tokenizer, scheduler


@contextlib.contextmanager
def model_load_errors(path, what):
    """A missing folder, a wrong hub id or no network: one line naming the path, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the {what} from {path}: {str(e).splitlines()[0][:200]}; "
                        "give a hub id or a folder laid out like the hub repo") from e


def use_sdpa_attention(prior):
    """Swap the classic matmul+softmax attention the constructor installs for PyTorch SDPA.

    Same output (checked in the tests), faster, and on a GPU it never materialises the attention matrix.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    prior.set_attn_processor(AttnProcessor2_0())


def build_prior_pipeline(prior, text_encoder, tokenizer, scheduler):
    # Assembled from parts: WuerstchenPriorPipeline.from_pretrained fails on diffusers 0.42.
    return WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)


def load_decoder_pipeline(path, revision=None, dtype=torch.float32, device="cpu"):
    """Stages B and A (decoder, VQGAN) with their own CLIP text encoder, from a repo like warp-ai/wuerstchen."""
    from transformers import CLIPTextModel, CLIPTokenizer

    with model_load_errors(path, "decoder"):
        parts = dict(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision),
            decoder=WuerstchenDiffNeXt.from_pretrained(path, subfolder="decoder", revision=revision),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
            vqgan=PaellaVQModel.from_pretrained(path, subfolder="vqgan", revision=revision),
        )
    pipe = WuerstchenDecoderPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


@torch.no_grad()
def generate_images(
    prior_pipeline,
    decoder_pipeline,
    prompts,
    *,
    height,
    width,
    generator,
    negative_prompt=None,
    num_images_per_prompt=1,
    prior_guidance_scale=4.0,
    decoder_steps=12,
    decoder_guidance_scale=0.0,
    check_embeddings=None,
    prior_steps=None,
):
    """Prior (with whatever LoRA is attached) -> image embeddings -> decoder -> PIL images.

    The single generation path: validation during training and infer.py both call it. One prompt
    at a time: the decoder pipeline repeats its prompt for every embedding it is given.
    `check_embeddings(prompt, embeddings)`, when given, sees each prompt's image embeddings before
    they are decoded (infer.py refuses non-finite ones there). `prior_steps`: that many evenly
    spaced prior steps instead of the pipeline's tuned DEFAULT_STAGE_C_TIMESTEPS.
    """
    images = []
    for prompt in prompts:
        embeddings = prior_pipeline(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            timesteps=DEFAULT_STAGE_C_TIMESTEPS if prior_steps is None else None,
            num_inference_steps=prior_steps or 60,
            guidance_scale=prior_guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type="pt",
        ).image_embeddings
        if check_embeddings is not None:
            check_embeddings(prompt, embeddings)  # before the decoder turns them into images
        images += decoder_pipeline(
            image_embeddings=embeddings.to(device=decoder_pipeline.device, dtype=decoder_pipeline.dtype),
            prompt=prompt,
            num_inference_steps=decoder_steps,
            guidance_scale=decoder_guidance_scale,
            generator=generator,
            output_type="pil",
        ).images
    return images


def output_size_for_training_resolution(resolution):
    """The output size a training resolution corresponds to: about 4/3 of it, on the 128 px grid.

    EfficientNet has stride 32 while the prior pipeline divides the output by 42.67, so a 768 px
    training image (24x24 grid) matches a 1024 px output.
    """
    return max(128, int(round(resolution * 4 / 3 / 128)) * 128)


# ----------------------------------------------------------------------------------------------
# LoRA file: written in the layout diffusers' `load_lora_weights` reads, and checked when loaded


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path beside `path`; rename it onto `path` only when the block completes.

    Readers never see a partial file, and a failure (a full disk, a crash) leaves the previous
    file as it was and no temporary behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:  # not mkstemp: its files are 0600; these get the user's umask like any other file
        tmp = os.path.join(folder, f".tmp-{os.urandom(6).hex()}-{os.path.basename(path)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        apply_umask(tmp)  # writers that replace the file themselves (safetensors: 0600) lose the mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask():
    """The process umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path):
    """Give a finished file the mode a plain open() would have: 0666 minus the umask."""
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError:  # file systems without modes
        pass


def atomic_write_bytes(path, data):
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_save_tensors(tensors, path, metadata=None):
    from safetensors.torch import save_file

    with replaced_atomically(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_png(image, path, text=None):
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))  # iTXt where the value is not Latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())


def image_formats():
    """Output formats by file extension: PNG and JPEG always, WebP where this PIL build has it."""
    from PIL import features

    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if features.check("webp"):
        formats[".webp"] = "WEBP"
    return formats


def save_image(image, path, text=None):
    """Write `image` atomically in the format its extension names (.png, .jpg/.jpeg, .webp).
    `text`: {key: value} stored in a PNG's text chunks (the settings it was made with)."""
    import io

    ext = os.path.splitext(path)[1].lower()
    fmt = image_formats().get(ext)
    if fmt is None:
        raise UserError(f"{path}: unsupported image type {ext or '(no extension)'}; use {', '.join(image_formats())}")
    if fmt == "PNG":
        return save_png(image, path, text)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, quality=95)  # JPEG and WebP have no alpha to keep here
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def lora_config_dict(config):
    """A peft LoraConfig as JSON-ready data (its target-module set becomes a sorted list)."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def save_lora_file(output_dir, lora_state_dict, config_dict, weight_name=LORA_WEIGHTS_NAME):
    """Write `pytorch_lora_weights.safetensors` through diffusers' own writer.

    Keys get the `prior.` prefix the pipeline loader filters on, and the LoRA config goes into the
    safetensors header so that alpha != rank round-trips (without it, loading assumes alpha = rank).
    The file is written into a temporary folder first and renamed into place.
    """
    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict.items()}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
        kwargs = {"unet_lora_layers": state}
        if config_dict is not None:
            kwargs["unet_lora_adapter_metadata"] = config_dict
        try:
            WuerstchenPriorPipeline.save_lora_weights(tmp, **kwargs)
        except TypeError:  # diffusers older than the metadata argument: alpha must then equal rank
            kwargs.pop("unet_lora_adapter_metadata")
            WuerstchenPriorPipeline.save_lora_weights(tmp, **kwargs)
        apply_umask(os.path.join(tmp, LORA_WEIGHTS_NAME))
        os.replace(os.path.join(tmp, LORA_WEIGHTS_NAME), os.path.join(output_dir, weight_name))
    return os.path.join(output_dir, weight_name)


PEFT_ADAPTER_DIR = "peft_adapter"


def save_peft_adapter(folder, lora_state_dict, lora_config):
    """The adapter in PEFT's own layout: adapter_config.json + adapter_model.safetensors, keys
    `base_model.model.<module>.lora_A.weight`, which `PeftModel.from_pretrained(prior, folder)` loads.
    The LoRA config also goes into the header, as in the diffusers file, so diffusers'
    `prior.load_lora_adapter(folder, weight_name="adapter_model.safetensors", prefix="base_model.model")`
    restores alpha too."""
    state = {f"base_model.model.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict.items()}
    config = lora_config_dict(lora_config)
    # diffusers keeps the config under keys prefixed like the tensors they belong to.
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"base_model.model.{k}": v for k, v in config.items()}, default=str)}
    atomic_save_tensors(state, os.path.join(folder, "adapter_model.safetensors"), metadata=header)
    # peft's own adapter_config.json, written aside and renamed into place.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        lora_config.save_pretrained(tmp)
        os.replace(os.path.join(tmp, "adapter_config.json"), os.path.join(folder, "adapter_config.json"))
    return folder


def lora_digest(state_dict):
    """sha256 of LoRA tensors (names without any 'prior.' prefix, fp32): equal weights, equal digest."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state_dict):
        name = key[len("prior.") :] if key.startswith("prior.") else key
        h.update(name.encode())
        h.update(state_dict[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def read_lora_keys(path):
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a damaged or non-safetensors file
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from e


def check_lora_file(lora_path):
    """Refuse, before any model loads, a file that is not a safetensors Wuerstchen prior LoRA."""
    if not lora_path.endswith(".safetensors"):
        raise UserError(f"{lora_path}: only .safetensors LoRA files are loaded (pickle files can run code)")
    keys = read_lora_keys(lora_path)
    prior_keys = [k for k in keys if k.startswith("prior.")]
    if not prior_keys or len(prior_keys) != len(keys):
        sample = ", ".join(sorted(k for k in keys if not k.startswith("prior."))[:2])
        raise UserError(
            f"{lora_path} is not a Wuerstchen prior LoRA: {len(keys) - len(prior_keys)} of {len(keys)} keys lack "
            f"the 'prior.' prefix (e.g. {sample}); train one with train_wuerstchen_prior_lora.py"
        )
    check_lora_structure(lora_path)
    check_lora_values(lora_path)
    return prior_keys


def check_lora_values(lora_path):
    """Every LoRA tensor finite: a file from a run that diverged (NaN/inf) gives black or noise
    images with status 0 otherwise. Reads the tensors one at a time (a LoRA file is small)."""
    bad, total = [], 0
    with safe_open(lora_path, framework="pt") as f:
        for key in sorted(f.keys()):
            total += 1
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad.append(key)
    if bad:
        raise UserError(f"{lora_path}: {len(bad)} of {total} LoRA tensors hold NaN or inf values (e.g. {bad[0]}); the run that wrote it diverged: "
                        "use an earlier checkpoint-N of that run, or train again with a lower --learning_rate")


# The prior's layers a LoRA can adapt (its Linear and Conv2d modules; blocks repeat ResBlock,
# TimestepBlock, AttnBlock): the same names at every width and depth.
PRIOR_LORA_MODULES = re.compile(
    r"(projection|cond_mapper\.[02]|out\.1|blocks\.\d+\.(depthwise|channelwise\.[04]|mapper|kv_mapper\.1|attention\.(to_q|to_k|to_v|to_out\.0)))")
LORA_TENSORS = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(\.weight)?)")


def check_lora_structure(lora_path):
    """Every tensor of the file is a LoRA part (lora_A / lora_B, DoRA's magnitude) of a layer the
    prior has, every lora_A has its lora_B and the two agree on the rank; else one UserError naming
    what is missing or wrong, before the pipeline's loader fails on it with an IndexError or a
    shape error. Reads the header only."""
    shapes, modules = {}, {}
    with safe_open(lora_path, framework="pt") as f:
        for key in f.keys():
            shapes[key] = f.get_slice(key).get_shape()
    for key in sorted(shapes):
        m = LORA_TENSORS.fullmatch(key[len("prior."):])
        if not m:
            raise UserError(f"{lora_path}: {key} is not a LoRA tensor (a LoRA file holds <layer>.lora_A.weight and <layer>.lora_B.weight); "
                            "this is not a LoRA file for the Wuerstchen prior: train one with train_wuerstchen_prior_lora.py")
        modules.setdefault(m["module"], {})[m["part"]] = shapes[key]
    unknown = sorted(name for name in modules if not PRIOR_LORA_MODULES.fullmatch(name))
    if unknown:
        raise UserError(f"{lora_path}: {len(unknown)} of {len(modules)} adapted layers are not layers of the Wuerstchen prior "
                        f"(e.g. prior.{unknown[0]}); the file was trained for another model")
    for other in ("lora_B.weight", "lora_A.weight"):
        lacking = sorted(name for name, parts in modules.items() if other not in parts)
        if lacking:
            raise UserError(f"{lora_path} is incomplete: {len(lacking)} of {len(modules)} layers have no {other.split('.')[0]} "
                            f"(e.g. prior.{lacking[0]}.{other} is missing); the file is damaged or cut short: save or download it again")
    for name in sorted(modules):
        a, b = modules[name]["lora_A.weight"], modules[name]["lora_B.weight"]
        if len(a) < 2 or len(b) < 2 or a[0] != b[1] or a[0] < 1:
            raise UserError(f"{lora_path}: prior.{name} has lora_A of shape {list(a)} and lora_B of shape {list(b)}, which disagree on the rank "
                            "(lora_A is [rank, in], lora_B [out, rank]); the file is damaged: save or download it again")


# Not "lora": older peft strips ".<adapter name>" from parameter names, which mangles "lora_A".
ADAPTER_NAME = "trained"


def load_lora_checked(prior_pipeline, lora_path, adapter_name=ADAPTER_NAME):
    """Load a LoRA file into the prior pipeline and make sure the prior took every tensor in it.

    diffusers skips keys with a foreign prefix with only a log line, which would silently give
    base-model images; here that is an error naming the file.
    """
    prior_keys = check_lora_file(lora_path)
    folder, name = os.path.split(os.path.abspath(lora_path))
    try:
        prior_pipeline.load_lora_weights(folder, weight_name=name, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as e:  # shapes or module names that do not fit this prior
        raise UserError(f"{lora_path} does not fit this prior: {str(e).splitlines()[0]}") from e
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(prior_pipeline.prior, adapter_name=adapter_name)
    wanted = {k[len("prior.") :].replace(f".{adapter_name}.", ".") for k in prior_keys}
    taken = {k.replace(f".{adapter_name}.", ".") for k in loaded}
    if wanted - taken:
        missing = sorted(wanted - taken)
        raise UserError(
            f"{lora_path}: the prior did not take {len(missing)} of {len(wanted)} LoRA tensors "
            f"(e.g. {missing[0]}); the file was trained for another model"
        )
    return len(wanted)


def read_training_info(lora_path):
    """The metadata the trainer writes beside the LoRA file (None for a bare file from elsewhere)."""
    path = os.path.join(os.path.dirname(os.path.abspath(lora_path)), TRAINING_INFO_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None
