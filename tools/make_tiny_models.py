"""Tiny random Wuerstchen v2 models and small image datasets for offline tests.

Everything is built with the REAL classes (diffusers ``WuerstchenPrior``,
``WuerstchenDiffNeXt``, ``PaellaVQModel``, ``DDPMWuerstchenScheduler``;
transformers ``CLIPTextModel`` / ``CLIPTokenizer``; torchvision
``efficientnet_v2_s``) and saved in the same on-disk layout as the hub repos
``warp-ai/wuerstchen-prior`` and ``warp-ai/wuerstchen``, so code that loads the
real models with ``from_pretrained(repo, subfolder=...)`` loads these too.
Nothing is downloaded.  Output is deterministic for a given seed.

CLI::

    python tools/make_tiny_models.py OUTDIR [--seed N]

prints ``{"prior": ..., "decoder": ..., "image_encoder": ..., "dataset": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "PRIOR_CONFIG",
    "DECODER_CONFIG",
    "VQGAN_CONFIG",
    "PRIOR_TEXT_ENCODER_HIDDEN",
    "DECODER_TEXT_ENCODER_HIDDEN",
    "DATASET_KINDS",
    "build_tokenizer",
    "make_prior_repo",
    "make_decoder_repo",
    "make_image_encoder",
    "make_image_dataset",
    "make_all",
]

# --------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------
# Real prior: c_in 16, c 1536, c_cond 1280, c_r 64, depth 32, nhead 24, dropout 0.1.
PRIOR_CONFIG = dict(c_in=16, c=32, c_cond=32, c_r=8, depth=2, nhead=2, dropout=0.1)
PRIOR_TEXT_ENCODER_HIDDEN = PRIOR_CONFIG["c_cond"]  # CLIP hidden size must equal c_cond

# Real decoder text encoder (CLIP ViT-H) has hidden 1024, different from the prior's 1280;
# keep them different here too so mixing the two encoders up fails loudly.
DECODER_TEXT_ENCODER_HIDDEN = 24

# Real decoder: c_in 4, c_out 4, c_r 64, patch 2, c_cond 1024, c_hidden [320, 640, 1280, 1280],
# nhead [-1, 10, 20, 20], blocks [4, 4, 14, 4], level_config [CT, CTA, CTA, CTA],
# inject_effnet [False, True, True, True], effnet_embd 16, clip_embd 1024.
# Two levels: latent side must be divisible by patch_size * 2 = 4 (int(grid * 10.67) for the
# 128 px steps the pipeline uses is a multiple of 32).
DECODER_CONFIG = dict(
    c_in=4,
    c_out=4,
    c_r=8,
    patch_size=2,
    c_cond=32,
    c_hidden=[16, 32],
    nhead=[-1, 2],
    blocks=[1, 1],
    level_config=["CT", "CTA"],
    inject_effnet=[False, True],
    effnet_embd=16,
    clip_embd=DECODER_TEXT_ENCODER_HIDDEN,
    kernel_size=3,
    dropout=0.1,
)
# Post-init weight scales of the tiny decoder (see _fix_decoder_init).
DECODER_EFFNET_MAPPER_STD = 0.3
DECODER_CLF_STD = 0.5
# Typical std of the latents the tiny decoder produces (the VQGAN is calibrated for it).
DECODER_LATENT_STD = 2.3

# Real vqgan: up_down_scale_factor 2, levels 2 (=> 4x spatial), bottleneck_blocks 12, embed_dim 384,
# latent_channels 4, num_vq_embeddings 8192, scale_factor 0.3764.  Keep the 4x geometry.
VQGAN_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    up_down_scale_factor=2,
    levels=2,
    bottleneck_blocks=1,
    embed_dim=16,
    latent_channels=4,
    num_vq_embeddings=64,
    scale_factor=0.3764,
)

DATASET_KINDS = ("imagefolder_jsonl", "imagefolder_csv", "txt_captions", "jsonl", "csv", "parquet")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# A few merges so that BPE actually merges something (results are added to the vocab).
_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "n</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("e", "r"),
    ("r", "e"),
    ("o", "f</w>"),
    ("c", "i"),
    ("o", "r"),
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _wuerstchen_classes():
    try:  # diffusers >= 0.38
        from diffusers.pipelines.deprecated.wuerstchen import (
            PaellaVQModel,
            WuerstchenDiffNeXt,
            WuerstchenPrior,
        )
    except ImportError:  # older diffusers
        from diffusers.pipelines.wuerstchen import (
            PaellaVQModel,
            WuerstchenDiffNeXt,
            WuerstchenPrior,
        )
    return WuerstchenPrior, WuerstchenDiffNeXt, PaellaVQModel


def _scheduler_class():
    from diffusers import DDPMWuerstchenScheduler

    return DDPMWuerstchenScheduler


def _diffusers_version():
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # pragma: no cover
        return "0.0.0"


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch's global CPU RNG inside the block; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def _fill_zero_params(model, std=0.02):
    """Give all-zero parameters small random values.

    Several of these classes zero-initialise output / modulation layers (DiffNeXt ``clf``,
    TimestepBlock mappers, GlobalResponseNorm gamma/beta, VQ mixing gammas).  Trained weights are
    never zero; with zeros, gradients through the model vanish and tests cannot see the effect of
    a LoRA.  Uses the global RNG (callers seed it).
    """
    for p in model.parameters():
        if p.numel() and not torch.any(p):
            p.normal_(0.0, std)


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode char table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tokenizer_vocab_and_merges():
    chars = _bytes_to_unicode()
    tokens = list(chars) + [c + "</w>" for c in chars]
    for a, b in _MERGES:
        merged = a + b
        if merged not in tokens:
            tokens.append(merged)
    # Special tokens last, like real CLIP (49406 / 49407): argmax(input_ids) finds EOS.
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, list(_MERGES)


def build_tokenizer(path=None):
    """Build the tiny byte-level CLIP tokenizer (offline). Saves it to ``path`` if given.

    Also writes ``vocab.json`` / ``merges.txt`` (the files the real hub repos ship), so that
    transformers 4 slow/fast tokenizers and transformers 5 load it alike.
    """
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = _tokenizer_vocab_and_merges()
    special = dict(unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=77)
    try:  # transformers 5: built from the vocabulary and merges themselves
        tok = CLIPTokenizer(vocab=vocab, merges=merges, **special)
    except TypeError:  # transformers 4: only from vocab.json + merges.txt files
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
            vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
            tok = CLIPTokenizer(str(vocab_file), str(merges_file), **special)
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
        if not (path / "vocab.json").exists():
            (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        if not (path / "merges.txt").exists():
            (path / "merges.txt").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
            )
    return tok


def _make_text_encoder(path, hidden, seed, num_hidden_layers=2, num_attention_heads=2, intermediate_size=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _tokenizer_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate_size or hidden * 2,
        projection_dim=hidden,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    with _seeded(seed):
        model = CLIPTextModel(config)
    model.eval()
    model.save_pretrained(str(path))
    return model


def _write_model_index(path, data):
    data = dict(data)
    data.setdefault("_diffusers_version", _diffusers_version())
    with open(Path(path) / "model_index.json", "w", encoding="utf-8") as f:
        json.dump(dict(sorted(data.items())), f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------
# repos
# --------------------------------------------------------------------------------------
def make_prior_repo(path, seed=0, prior=None, text_encoder=None) -> str:
    """Write a repo laid out like ``warp-ai/wuerstchen-prior``; returns ``path``.

    By default the tiny prior and text encoder; ``prior`` (a built WuerstchenPrior) and
    ``text_encoder`` (CLIP sizes: hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size) give other sizes, as the benchmark's scaled prior.
    """
    WuerstchenPrior, _, _ = _wuerstchen_classes()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    if prior is None:
        with _seeded(seed):
            prior = WuerstchenPrior(**PRIOR_CONFIG)
            _fill_zero_params(prior)
            # The output is (x - a) / |1 - b|: with default init some b land near 1 and the
            # prediction (and every gradient) explodes.  Trained priors have small a, b; do the same.
            with torch.no_grad():
                prior.out[1].weight.normal_(0.0, 0.02)
                prior.out[1].bias.zero_()
    prior.save_pretrained(str(root / "prior"))

    sizes = dict(text_encoder or {"hidden_size": PRIOR_TEXT_ENCODER_HIDDEN})
    _make_text_encoder(root / "text_encoder", sizes.pop("hidden_size"), seed + 1, **sizes)
    build_tokenizer(root / "tokenizer")
    _scheduler_class()().save_pretrained(str(root / "scheduler"))

    _write_model_index(
        root,
        {
            "_class_name": "WuerstchenPriorPipeline",
            "latent_mean": 42.0,
            "latent_std": 1.0,
            "resolution_multiple": 42.67,
            "prior": ["wuerstchen", "WuerstchenPrior"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
    )
    return str(path)


@torch.no_grad()
def _fix_decoder_init(decoder):
    """Make the random DiffNeXt actually use its inputs, as a trained stage B does.

    ``WuerstchenDiffNeXt._init_weights`` runs once per module (``self.apply``) and each run
    multiplies every ResBlock's last channelwise weight by sqrt(1/sum(blocks)) again, so those
    weights end up ~1e-11: every ResBlock is an identity and the effnet conditioning (which
    enters only through ResBlock skips) has no effect at all.  Give them the intended
    xavier * sqrt(1/sum(blocks)) init, and make the conditioning / output layers large enough
    that the image embeddings visibly steer the decoded image.  Uses the global RNG.
    """
    import torch.nn as nn

    _, WuerstchenDiffNeXt, _ = _wuerstchen_classes()
    res_cls = sys.modules[WuerstchenDiffNeXt.__module__].ResBlockStageB
    gain = float(np.sqrt(1.0 / sum(decoder.config.blocks)))
    for mod in decoder.modules():
        if isinstance(mod, res_cls):
            nn.init.xavier_uniform_(mod.channelwise[-1].weight, gain=gain)
    for mapper in decoder.effnet_mappers:
        if mapper is not None:
            mapper.weight.normal_(0.0, DECODER_EFFNET_MAPPER_STD)
    # clf outputs (a, b) -> noise = (x - a) / b.  Large weights on the ``a`` half make the
    # prediction depend on the network (and so on the conditioning), not only on x; the ``b``
    # half stays small so that b ~ sigmoid(0) = 0.5 and the division stays tame.
    clf = decoder.clf[1]
    half = clf.out_channels // 2
    clf.weight[:half].normal_(0.0, DECODER_CLF_STD)
    clf.weight[half:].normal_(0.0, 0.02)
    clf.bias.zero_()


@torch.no_grad()
def _calibrate_vqgan_decoder(vqgan, latent_std=None, out_mean=0.5, out_std=0.2):
    """Affinely rescale the VQGAN's output conv so decoded images are mid-grey with visible contrast.

    A random PaellaVQModel decodes to values around 0 (most pixels clamp to black) and its
    output barely depends on the latents.  Decode a fixed batch of N(0, latent_std) latents
    (``latent_std`` ~ what the tiny decoder produces) and fold a per-RGB-channel affine map into
    the last 1x1 conv so that the (pre-clamp) output has mean ``out_mean`` and std ``out_std``.
    Uses the global RNG.
    """
    import torch.nn as nn

    latent_std = DECODER_LATENT_STD if latent_std is None else float(latent_std)
    vqgan.eval()
    # Default-init biases of the decoding convs (+-1/sqrt(fan_in), +-0.5 for the 4-channel input
    # conv) dwarf the latent signal, and the stride-2 transposed conv turns a constant input into
    # a fixed checkerboard: the picture would be the same pattern whatever the latents.
    for mod in vqgan.up_blocks.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod.groups == 1 and mod.bias is not None:
            mod.bias.zero_()
    z = torch.randn(4, vqgan.config.latent_channels, 16, 16) * latent_std
    conv, r2 = vqgan.out_block[0], vqgan.config.up_down_scale_factor**2
    feats = conv(vqgan.up_blocks(z * vqgan.config.scale_factor))
    # Per conv channel (= per RGB channel and PixelShuffle phase) mean: removing it also removes
    # the 2x2 checkerboard that different biases of the four phases would draw.
    m_conv = feats.mean(dim=(0, 2, 3))
    std = vqgan.out_block[1](feats - m_conv.view(1, -1, 1, 1)).std(dim=(0, 2, 3)).clamp_min(1e-6)
    k_conv = (out_std / std).repeat_interleave(r2)  # PixelShuffle: conv channel c * r2 + j -> RGB c
    # Round the measured statistics to bfloat16 precision so that tiny float differences
    # (thread count, CPU kind) give the same file.
    k_conv = k_conv.to(torch.bfloat16).float()
    m_conv = m_conv.to(torch.bfloat16).float()
    conv.weight.mul_(k_conv.view(-1, 1, 1, 1))
    conv.bias.copy_((conv.bias - m_conv) * k_conv + out_mean)


def make_decoder_repo(path, seed=0) -> str:
    """Write a tiny repo laid out like ``warp-ai/wuerstchen`` (stages B + A); returns ``path``."""
    _, WuerstchenDiffNeXt, PaellaVQModel = _wuerstchen_classes()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    with _seeded(seed + 10):
        decoder = WuerstchenDiffNeXt(**DECODER_CONFIG)
        _fill_zero_params(decoder)
        _fix_decoder_init(decoder)
    decoder.save_pretrained(str(root / "decoder"))

    with _seeded(seed + 11):
        vqgan = PaellaVQModel(**VQGAN_CONFIG)
        _fill_zero_params(vqgan)
        _calibrate_vqgan_decoder(vqgan)
    vqgan.eval()
    vqgan.save_pretrained(str(root / "vqgan"))

    _make_text_encoder(root / "text_encoder", DECODER_TEXT_ENCODER_HIDDEN, seed + 12)
    build_tokenizer(root / "tokenizer")
    _scheduler_class()().save_pretrained(str(root / "scheduler"))

    _write_model_index(
        root,
        {
            "_class_name": "WuerstchenDecoderPipeline",
            "latent_dim_scale": 10.67,
            "decoder": ["wuerstchen", "WuerstchenDiffNeXt"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "vqgan": ["wuerstchen", "PaellaVQModel"],
        },
    )
    return str(path)


def _build_effnet_encoder():
    import torch.nn as nn
    from torchvision.models import efficientnet_v2_s

    class _EfficientNetEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = efficientnet_v2_s(weights=None).features
            self.mapper = nn.Sequential(nn.Conv2d(1280, 16, kernel_size=1, bias=False), nn.BatchNorm2d(16))

        def forward(self, x):
            return self.mapper(self.backbone(x))

    return _EfficientNetEncoder()


@torch.no_grad()
def _calibrate_batchnorm(model, seed, n=16, size=128):
    """Set BatchNorm running stats from one batch of synthetic, ImageNet-normalised pictures.

    With freshly initialised running stats (mean 0, var 1) the eval-mode output of a random
    EfficientNetV2-S does not depend on the input at all (activations die out over 40 blocks),
    so latents of different images would be identical.  Running statistics of one batch make
    every layer see O(1) activations, as in a trained network.  The stats are rounded to bfloat16
    precision so that tiny float differences (thread count, CPU kind) give the same file.
    """
    import torch.nn as nn

    rng = np.random.default_rng(10_000 + int(seed))
    imgs = [np.asarray(_draw_image(i, (size, size), rng)[0], dtype=np.float32) / 255.0 for i in range(n)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std

    model.eval()  # stochastic depth off
    # Small residual-branch gains (trained nets end up like this too): without them the eval-mode
    # output of a random 40-block network is chaotic (std 1 at one resolution, 50 at another).
    for mod in model.modules():
        if getattr(mod, "use_res_connect", False):
            last_bn = [b for b in mod.block.modules() if isinstance(b, nn.BatchNorm2d)][-1]
            last_bn.weight.uniform_(0.03, 0.07)
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> exactly its statistics
        bn.train()
    # In train mode every BatchNorm normalises with the batch statistics, so one pass calibrates
    # each layer on inputs that the layers before it already normalised.
    model(x)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
        bn.eval()
        bn.running_mean.copy_(bn.running_mean.to(torch.bfloat16).float())
        bn.running_var.copy_(bn.running_var.to(torch.bfloat16).float().clamp_min(1e-3))
    model.eval()


def make_image_encoder(path, seed=0) -> str:
    """Write random-init weights of the REAL EfficientNetV2-S image encoder (stage C latents).

    ``*.safetensors``: the state dict (keys ``backbone.*``, ``mapper.*``).
    ``*.pt`` / ``*.pth``: ``torch.save({"effnet_state_dict": sd})`` like ``model_v2_stage_b.pt``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"unsupported image encoder suffix {suffix!r} (use .safetensors, .pt or .pth)")
    with _seeded(seed + 20):
        model = _build_effnet_encoder()
        _calibrate_batchnorm(model, seed)
        # Non-trivial mapper BatchNorm affine (trained ones are never identity), still O(1) output.
        with torch.no_grad():
            bn = model.mapper[1]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    model.eval()
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"effnet_state_dict": sd}, str(path))
    return str(path)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle", "stripe")
_MODES = ("RGB", "RGBA", "P", "L", "CMYK", "I;16")
_MIXED_SIZES = ((96, 80), (64, 128), (160, 64), (80, 80), (128, 96), (64, 64), (200, 100), (72, 144))


def _draw_image(i, size, rng):
    """Deterministic picture: two-colour gradient background + one or two coloured shapes."""
    w, h = size
    names = list(_COLORS)
    bg_a = names[(i * 3 + int(rng.integers(0, 8))) % len(names)]
    bg_b = names[(i * 5 + 1 + int(rng.integers(0, 8))) % len(names)]
    if bg_b == bg_a:
        bg_b = names[(names.index(bg_a) + 1) % len(names)]
    fg = names[(i + int(rng.integers(1, 8))) % len(names)]
    if fg in (bg_a, bg_b):
        fg = names[(names.index(fg) + 3) % len(names)]
        if fg in (bg_a, bg_b):
            fg = names[(names.index(fg) + 3) % len(names)]
    shape = _SHAPES[i % len(_SHAPES)]

    ca = np.array(_COLORS[bg_a], dtype=np.float32)
    cb = np.array(_COLORS[bg_b], dtype=np.float32)
    if i % 2 == 0:
        t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None].repeat(h, 0)
        direction = "horizontal"
    else:
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None].repeat(w, 1)
        direction = "vertical"
    arr = ca * (1 - t) + cb * t
    arr += rng.normal(0.0, 6.0, size=arr.shape).astype(np.float32)  # a little texture
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    d = ImageDraw.Draw(img)
    s = min(w, h)
    r = int(s * float(rng.uniform(0.2, 0.35)))
    cx = int(rng.integers(r, max(r + 1, w - r)))
    cy = int(rng.integers(r, max(r + 1, h - r)))
    col = _COLORS[fg]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    else:
        for k in range(-2, 3):
            x0 = cx + k * r // 2
            d.rectangle([x0, 0, x0 + max(2, r // 5), h], fill=col)
    caption = f"a {fg} {shape} on a {direction} {bg_a} to {bg_b} gradient"
    return img, caption, {"fg": fg, "shape": shape}


def _convert_mode(img, mode, rng):
    """Convert an RGB picture to ``mode``; returns (image, extension, save kwargs)."""
    if mode == "RGB":
        return img, ".png", {}
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        a = np.full((img.height, img.width), 255, dtype=np.uint8)
        a[:, : img.width // 3] = 0  # fully transparent band
        a[:, img.width // 3 : 2 * img.width // 3] = 128  # half transparent band
        rgba.putalpha(Image.fromarray(a, "L"))
        return rgba, ".png", {}
    if mode == "P":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return p, ".png", {"transparency": 0}  # palette transparency, a classic loader pitfall
    if mode == "L":
        return img.convert("L"), ".png", {}
    if mode == "CMYK":
        return img.convert("CMYK"), ".jpg", {"quality": 95}
    if mode == "I;16":
        g = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        im16 = Image.fromarray(g.astype("<u2"))
        if im16.mode != "I;16":  # older Pillow
            im16 = Image.frombytes("I;16", im16.size, g.astype("<u2").tobytes())
        return im16, ".png", {}
    raise ValueError(mode)


def _render_images(n, size, seed, mixed_modes):
    """Returns a list of (file_name, encoded bytes, caption)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if mixed_modes:
            sz = _MIXED_SIZES[i % len(_MIXED_SIZES)]
            mode = _MODES[i % len(_MODES)]
        else:
            sz = tuple(int(v) for v in size)
            mode = "RGB"
        img, caption, _ = _draw_image(i, sz, rng)
        img, ext, kw = _convert_mode(img, mode, rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if ext == ".jpg" else "PNG", **kw)
        out.append((f"img_{i:03d}{ext}", buf.getvalue(), caption))
    return out


def make_image_dataset(path, kind, n=8, size=(96, 80), seed=0, mixed_modes=False) -> str:
    """Write ``n`` small captioned images as dataset ``kind``; returns what to pass to ``--dataset``.

    ``size`` is (width, height).  ``mixed_modes=True`` cycles RGB, RGBA (transparent), P (with
    palette transparency), L, CMYK (.jpg), I;16 (16-bit .png) and varies sizes/aspect ratios
    (short side >= 64).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    items = _render_images(int(n), size, seed, mixed_modes)

    def write_images(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, data, _ in items:
            (folder / name).write_bytes(data)

    if kind == "imagefolder_jsonl":
        write_images(root)
        with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name, _, cap in items:
                f.write(json.dumps({"file_name": name, "text": cap}) + "\n")
        return str(root)
    if kind == "imagefolder_csv":
        write_images(root)
        with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "text"])
            for name, _, cap in items:
                w.writerow([name, cap])
        return str(root)
    if kind == "txt_captions":
        write_images(root)
        for name, _, cap in items:
            (root / (Path(name).stem + ".txt")).write_text(cap + "\n", encoding="utf-8")
        return str(root)
    if kind == "jsonl":
        write_images(root / "images")
        target = root / "data.jsonl"
        with open(target, "w", encoding="utf-8") as f:
            for name, _, cap in items:
                f.write(json.dumps({"image": f"images/{name}", "caption": cap}) + "\n")
        return str(target)
    if kind == "csv":
        write_images(root / "images")
        target = root / "data.csv"
        with open(target, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for name, _, cap in items:
                w.writerow([f"images/{name}", cap])
        return str(target)
    # parquet: HF datasets Image() encoding ({"bytes", "path"} structs) + "text"
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": name} for name, data, _ in items],
            "text": [cap for _, _, cap in items],
        },
        features=features,
    )
    target = root / "data.parquet"
    ds.to_parquet(str(target))
    return str(target)


# --------------------------------------------------------------------------------------
def make_all(root, seed=0) -> dict:
    """Build prior repo, decoder repo, image encoder and an imagefolder_jsonl dataset under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {
        "prior": make_prior_repo(root / "prior_repo", seed=seed),
        "decoder": make_decoder_repo(root / "decoder_repo", seed=seed),
        "image_encoder": make_image_encoder(root / "effnet.safetensors", seed=seed),
        "dataset": make_image_dataset(root / "data", "imagefolder_jsonl", seed=seed),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to write the tiny models and dataset into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_all(args.outdir, seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
