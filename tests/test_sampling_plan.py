"""One sampling plan: the uncached path (pixels) and the cached path (embeddings on the 32 px
lattice) make the same per-sample choices for the same (seed, epoch, index).

No models: the "image encoder" averages 32x32 pixel blocks (one cell per block, like EfficientNet's
grid, and exact under crops on the lattice and flips) and the "text encoder" stores the caption's
characters, so every choice can be read back from what each path returns."""

import types

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from conftest import OneProcess
from PIL import Image

from wuerstchen_lora.cache import CachedExamples, build_cache, image_for_cache
from wuerstchen_lora.data import (
    CaptionedImages,
    CaptionOptions,
    ImageTransform,
    sample_plan,
)
from wuerstchen_lora.models import IMAGENET_MEAN, IMAGENET_STD

RES = 64
# (width, height): lattice-aligned wide and tall images, one with a single free cell, one square
# (nothing to move), and one not on the lattice (its cache trims 150 -> 128 px, 11 px off the left).
SIZES = [(160, 64), (64, 160), (96, 64), (64, 64), (150, 64)]
CAPTIONS = [
    ["red, square, big, outline", "a red square", "", "blue, small, round"],  # the empty one is no caption
    ["one caption only, x, y"],
    [],  # no caption at all: the empty caption
    ["a, b, c, d, e, f", "g, h, i"],
    ["last, row"],
]


def coordinate_image(w, h):
    """Red = x, green = y: a crop shows where it was taken, and a flip shows as falling red."""
    array = np.full((h, w, 3), 128, np.uint8)
    array[..., 0] = np.arange(w)[None, :]
    array[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(array)


def encode_image(pixels):
    return F.avg_pool2d(pixels, 32)


def encode_text(captions):
    out = torch.zeros(len(captions), 77, 1)
    for k, caption in enumerate(captions):
        out[k, : len(caption), 0] = torch.tensor([float(ord(c)) for c in caption[:77]])
    return out


def decode_text(embedding):
    return "".join(chr(int(v)) for v in embedding[:, 0] if v > 0)


def unnormalise(channel, c):
    """Pixel values 0..255 of channel `c` (red or green) from normalised values."""
    return (channel * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255


def read_pixels(pixels):
    """(top px, left px, flipped) of an uncached crop, in the image as resized (no resize here)."""
    x, y = unnormalise(pixels[0, 0], 0).round(), unnormalise(pixels[1, :, 0], 1).round()
    assert torch.equal(x.diff().abs(), torch.ones(len(x) - 1)), "the resize changed the image"
    return int(y.min()), int(x.min()), bool(x[0] > x[-1])


def read_cells(window, trim_left):
    """(top cell, left cell, flipped) of a cached window: a cell's mean x is 32 c + 15.5 (+ the trim)."""
    x, y = unnormalise(window[0, 0], 0), unnormalise(window[1, :, 0], 1)
    left, top = (float(x.min()) - 15.5 - trim_left) / 32, (float(y.min()) - 15.5) / 32
    assert abs(left - round(left)) < 1e-3 and abs(top - round(top)) < 1e-3
    return round(top), round(left), bool(x[0] > x[-1])


def same_fraction(px, free_px, cell, free_cells):
    """Both offsets can come from one fraction: the fractions that give each overlap."""
    return max(px / (free_px + 1), cell / (free_cells + 1)) < min((px + 1) / (free_px + 1), (cell + 1) / (free_cells + 1))


def make_dataset():
    features = datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": [coordinate_image(w, h) for w, h in SIZES], "text": CAPTIONS}, features=features)


def test_cached_and_uncached_make_the_same_choices(tmp_path):
    """Random crop, flip, caption dropout, list captions, tag shuffling: for every (epoch, index)
    both paths flip alike, pick and drop the same caption, shuffle its tags alike, draw bit-identical
    noise, and place the crop at the same fraction of their own range (pixels, cells); on the
    lattice, the same window."""
    dataset = make_dataset()
    data = types.SimpleNamespace(resolution=RES, center_crop=False, random_flip=True, dataloader_num_workers=0)
    cache = types.SimpleNamespace(cache_batch_size=3)
    plain = CaptionOptions(prefix="sks, ", dropout=0.3)
    shuffled = CaptionOptions(prefix="sks, ", dropout=0.3, shuffle_tags=True, keep_tokens=1)
    build_cache(str(tmp_path / "c"), dataset, ("image", "text"), data, cache, encode_image, encode_text, OneProcess(), captions=plain)
    seen = {"flip": set(), "drop": set(), "caption": set(), "same window": 0, "moved": set()}
    for opts in (plain, shuffled):
        uncached = CaptionedImages(dataset, "image", "text", ImageTransform(RES, center_crop=False, random_flip=True), seed=7,
                                   captions=opts, repeats=2, latent_channels=3, noise_offset=0.1)
        cached = CachedExamples(str(tmp_path / "c"), RES, random_flip=True, seed=7, captions=opts,
                                raw_captions=dataset["text"] if opts.shuffle_tags else None, repeats=2, noise_offset=0.1)
        assert len(cached) == len(uncached) == 2 * len(SIZES)
        for epoch in range(8):
            uncached.set_epoch(epoch)
            cached.set_epoch(epoch)
            for index in range(len(cached)):
                a, b = uncached[index], cached[index]
                where = f"epoch {epoch} index {index} shuffle_tags={opts.shuffle_tags}"
                assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["timestep"], b["timestep"]), where
                caption = b["caption"] if opts.shuffle_tags else decode_text(b["text_embeddings"])
                assert a["caption"] == caption, where
                seen["drop"].add(caption == "")
                seen["caption"].add(caption)

                w, h = SIZES[index % len(SIZES)]
                grid_w, grid_h = w // 32, h // 32  # the cache trims to the lattice, keeping the centre
                trim_left = round((w - 32 * grid_w) / 2)
                top_px, left_px, flip_px = read_pixels(a["pixel_values"])
                top_cell, left_cell, flip_cell = read_cells(b["image_embeddings"], trim_left)
                assert flip_px == flip_cell, where
                seen["flip"].add(flip_px)
                for px, free_px, cell, free_cells in ((top_px, h - RES, top_cell, grid_h - 2), (left_px, w - RES, left_cell, grid_w - 2)):
                    assert same_fraction(px, free_px, cell, free_cells), (where, px, free_px, cell, free_cells)
                    seen["moved"].add(px)
                if w % 32 == 0 and h % 32 == 0:  # lattice-aligned
                    assert abs(top_px - 32 * top_cell) < 32 and abs(left_px - 32 * left_cell) < 32, where
                    if top_px % 32 == 0 and left_px % 32 == 0:  # a pixel crop on the lattice: the same window
                        assert (top_px, left_px) == (32 * top_cell, 32 * left_cell), where
                        torch.testing.assert_close(encode_image(a["pixel_values"][None])[0], b["image_embeddings"], rtol=0, atol=1e-5)
                        seen["same window"] += (w, h) != (RES, RES)  # not counting the square (nothing moves)
    assert seen["flip"] == {True, False} and seen["drop"] == {True, False}
    assert {"sks, a red square", "sks, blue, small, round", "sks, red, square, big, outline"} <= seen["caption"]  # list captions, every one
    assert any(c.startswith("sks, red, ") and c != "sks, red, square, big, outline" for c in seen["caption"])  # shuffled tags
    assert "" in seen["caption"] and len(seen["moved"]) > 10 and seen["same window"] >= 3


def test_centre_crop_is_the_caches_centre(tmp_path):
    """--center_crop: the uncached crop is the cache's (torchvision's centre, also for odd margins)."""
    flipped = next(plan for plan in (sample_plan(0, 0, i, random_flip=True) for i in range(100)) if plan.flip)
    for w in (64, 65, 67, 96, 99):
        image = coordinate_image(w, 64)
        pixels = ImageTransform(RES, center_crop=True)(image)
        cached = image_for_cache(image, RES, center_crop=True)
        assert torch.equal(pixels, ImageTransform(RES, center_crop=True)(cached))
        assert torch.equal(ImageTransform(RES, center_crop=True, random_flip=True)(image, flipped), pixels.flip(-1))


def test_plan_is_a_function_of_seed_epoch_index():
    plans = {(s, e, i): sample_plan(s, e, i, captions=3, dropout=0.5, random_flip=True) for s in (0, 1) for e in (0, 1) for i in range(50)}
    assert all(sample_plan(s, e, i, captions=3, dropout=0.5, random_flip=True) == p for (s, e, i), p in plans.items())
    assert len({p.noise_seed for p in plans.values()}) == len(plans)
    assert {p.caption_index for p in plans.values()} == {0, 1, 2}
    for (s, e, i), p in plans.items():
        # Options change only their own choice: the other draws stay where they were.
        bare = sample_plan(s, e, i)
        assert (bare.noise_seed, bare.tag_seed, bare.crop) == (p.noise_seed, p.tag_seed, p.crop)
        assert not bare.flip and not bare.drop_caption and bare.caption_index == 0
        assert sample_plan(s, e, i, captions=7, random_flip=True).flip == p.flip


def test_crop_offsets_in_pixels_and_cells_agree():
    """A pixel offset on the lattice gives the cell of that lattice point; any other lies within a
    cell of it. Every offset 0..free can come up."""
    for cells in range(0, 6):
        pixel_offsets = set()
        for i in range(3000):
            plan = sample_plan(0, 0, i)
            (top, left), (top_c, left_c) = plan.crop_offset(32 * cells, 32 * cells), plan.crop_offset(cells, cells)
            for px, c in ((top, top_c), (left, left_c)):
                assert abs(px - 32 * c) < 32 and 0 <= c <= cells
                if px % 32 == 0:
                    assert px == 32 * c
            pixel_offsets.add(left)
        assert pixel_offsets == set(range(32 * cells + 1))
