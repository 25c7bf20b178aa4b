"""Training data for the prior: find the dataset, its columns, and turn rows into tensors.

`--dataset` may be a hub dataset name, an imagefolder (images + metadata.jsonl/.csv/.parquet), a
folder of images each with a same-stem `.txt` caption (the kohya/OneTrainer convention), or a
`.jsonl`/`.csv`/`.parquet` file whose image column holds paths (relative to the file) or image bytes.
"""

import dataclasses
import hashlib
import io
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from wuerstchen_models import IMAGENET_MEAN, IMAGENET_STD, UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IMAGE_COLUMN_NAMES = ("image", "img", "images", "file_name", "image_path", "path", "file")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "description", "tags")


# ----------------------------------------------------------------------------------------------
# Finding the dataset


def _list_images(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


NON_UTF8_CAPTIONS = []  # caption files that were not UTF-8 (read as Latin-1), for the run summary


def read_caption_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        NON_UTF8_CAPTIONS.append(path)
        return raw.decode("latin-1").strip()


def _caption_folder(folder, images):
    """A folder of images with same-stem .txt captions, as a datasets.Dataset."""
    import datasets

    paths, captions, missing = [], [], []
    for image in images:
        txt = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(txt):
            missing.append(os.path.relpath(image, folder))
            continue
        captions.append(read_caption_file(txt))
        paths.append(image)
    if missing:
        raise UserError(
            f"--dataset {folder}: {len(missing)} of {len(images)} images have no caption file "
            f"(e.g. {missing[0]}); add a same-stem .txt beside each image or remove them"
        )
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "text": captions}, features=features)


def _load_from_folder(folder, cache_dir):
    import datasets

    if any(os.path.isfile(os.path.join(folder, m)) for m in METADATA_FILES):
        return datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    images = _list_images(folder)
    if not images:
        raise UserError(f"--dataset {folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for p in images):
        raise UserError(
            f"--dataset {folder}: {len(images)} images but no captions; add metadata.jsonl "
            "(file_name, text) or a same-stem .txt caption beside each image"
        )
    return _caption_folder(folder, images)


def _load_from_file(path, cache_dir):
    import datasets

    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise UserError(f"--dataset {path}: unsupported file type; use .jsonl, .csv or .parquet, or a folder")
    if os.path.getsize(path) == 0:
        raise UserError(f"--dataset {path}: the file is empty")
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # the builders raise many types for a malformed file; all mean the same to the user
        raise UserError(f"--dataset {path}: could not be read as {builder} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _load_from_hub(name, revision, cache_dir):
    import datasets

    try:
        return datasets.load_dataset(name, revision=revision, split="train", cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"--dataset {name}: not a local folder or file, and the hub dataset could not be loaded "
            f"({type(e).__name__}); check the name, your network, or give a local path"
        ) from e


def _pick_column(dataset, requested, flag, candidates, want_image):
    columns = list(dataset.column_names)
    if requested:
        if requested not in columns:
            raise UserError(f"{flag} {requested!r} is not a column; the dataset has: {', '.join(columns)}")
        return requested
    import datasets

    if want_image:
        typed = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
        if typed:
            return typed[0]
    for name in candidates:
        if name in columns:
            return name
    kind = "image" if want_image else "caption"
    raise UserError(f"no {kind} column found; pass {flag} (the dataset has: {', '.join(columns)})")


def load_training_dataset(spec, image_column=None, caption_column=None, revision=None, cache_dir=None):
    """Returns (datasets.Dataset, image column, caption column) with the image column decoded to PIL."""
    import datasets

    if not spec:
        raise UserError("--dataset is required: a hub dataset name, a local folder, or a .jsonl/.csv/.parquet file")
    if os.path.isdir(spec):
        dataset = _load_from_folder(spec, cache_dir)
    elif os.path.isfile(spec):
        dataset = _load_from_file(spec, cache_dir)
    elif os.path.splitext(spec)[1].lower() in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise UserError(f"--dataset {spec}: no such file or folder")
    else:
        dataset = _load_from_hub(spec, revision, cache_dir)
    if len(dataset) == 0:
        raise UserError(f"--dataset {spec}: the dataset is empty")

    image_column = _pick_column(dataset, image_column, "--image_column", IMAGE_COLUMN_NAMES, want_image=True)
    caption_column = _pick_column(dataset, caption_column, "--caption_column", CAPTION_COLUMN_NAMES, want_image=False)
    if not isinstance(dataset.features[image_column], datasets.Image):
        # A column of paths: relative ones are relative to the file that lists them.
        base = os.path.dirname(os.path.abspath(spec)) if os.path.isfile(spec) else None
        if base is not None:
            dataset = dataset.map(
                lambda row: {image_column: os.path.join(base, row[image_column])},
                desc="Resolving image paths",
            )
        dataset = dataset.cast_column(image_column, datasets.Image())
    return dataset, image_column, caption_column


# ----------------------------------------------------------------------------------------------
# Checking every image once, before training

MIN_IMAGE_SIDE = 32  # one EfficientNet cell; anything smaller is upscaled into mush


def inspect_image(value):
    """(problem or None, (width, height) as displayed) for an undecoded image value ({"bytes", "path"} or a path)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = None, value
    try:
        if data is None and path and os.path.getsize(path) == 0:
            return "empty file", None
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            w, h = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                w, h = h, w
    except FileNotFoundError:
        return "file not found", None
    except (Image.UnidentifiedImageError, Image.DecompressionBombError):
        return "not an image", None
    except (OSError, ValueError, SyntaxError) as e:
        return f"truncated or corrupt ({str(e).splitlines()[0][:80]})", None
    if min(w, h) < MIN_IMAGE_SIDE:
        return f"too small ({w}x{h}; the short side needs {MIN_IMAGE_SIDE} px)", (w, h)
    return None, (w, h)


def inspect_images(dataset, image_column, indices):
    """({index: (width, height)} of the usable images, [(index, name, reason)] of the others)."""
    import datasets

    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    sizes, bad = {}, []
    for i in indices:
        value = raw[i][image_column]
        reason, size = inspect_image(value)
        if reason:
            name = value.get("path") if isinstance(value, dict) else value
            bad.append((i, name or f"row {i}", reason))
        else:
            sizes[i] = size
    return sizes, bad


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def make_buckets(resolution, max_aspect=4.0):
    """(width, height) pairs with sides that are multiples of 32 and about resolution^2 pixels
    (never more), aspect ratios up to `max_aspect`:1 either way."""
    area = resolution * resolution
    buckets = set()
    for w in range(32, int(resolution * max_aspect) + 1, 32):
        h = area // w // 32 * 32
        if h >= 32 and max(w / h, h / w) <= max_aspect:
            buckets.add((w, h))
    return sorted(buckets)


def assign_bucket(size, buckets):
    """The bucket whose aspect ratio is nearest to the image's (in log space); the larger on a tie."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def upscale_needed(size, bucket):
    """How much an image must be enlarged to cover its bucket."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches drawn from one bucket at a time, every batch full (a bucket's last batch is topped up
    with other images of that bucket), in an order fixed by (seed, epoch)."""

    def __init__(self, row_buckets, batch_size, seed, repeats=1):
        self.row_buckets, self.batch_size, self.seed, self.repeats = row_buckets, batch_size, seed, repeats
        self.drop_last = False  # read by accelerate when it shards the batches between processes
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _groups(self):
        groups = {}
        for i in range(len(self.row_buckets) * self.repeats):
            groups.setdefault(self.row_buckets[i % len(self.row_buckets)], []).append(i)
        return groups

    def __len__(self):
        return sum(math.ceil(len(g) / self.batch_size) for g in self._groups().values())

    def __iter__(self):
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for _, indices in sorted(self._groups().items()):
            rng.shuffle(indices)
            short = -len(indices) % self.batch_size
            indices += rng.choices(indices, k=short)
            batches += [indices[j : j + self.batch_size] for j in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def caption_list(value):
    """The non-empty captions of a row's caption value (one string or a list), stripped."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def caption_stats(dataset, caption_column, tokenizer=None):
    """Counts of empty captions and of captions longer than the text encoder's 77 tokens."""
    empty = long = 0
    limit = getattr(tokenizer, "model_max_length", 77)
    for value in dataset[caption_column]:
        texts = caption_list(value)
        empty += not texts
        if tokenizer is not None and texts:
            long += any(len(ids) > limit for ids in tokenizer(texts).input_ids)
    return {"empty_captions": empty, "long_captions": long, "non_utf8_caption_files": len(NON_UTF8_CAPTIONS)}


# ----------------------------------------------------------------------------------------------
# Rows to tensors


def to_rgb(image):
    """Any PIL image (RGBA, palette, greyscale, CMYK, 16-bit, EXIF-rotated) as 8-bit RGB.

    Transparency is composited over white; 16- and 32-bit greyscale are rescaled rather than
    clipped (PIL's own convert("RGB") turns most 16-bit values into white).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def sample_rng(seed, epoch, index):
    """A random source for one sample in one epoch.

    Crops, flips, caption choices and the sample's diffusion noise and timestep come from
    (seed, epoch, index) alone, so a resumed run, or a run with another worker or process count,
    sees exactly the same samples. torchvision's random
    transforms draw from the global RNG, which does not give that; hence the hand-written choices.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_noise(noise_seed, shape, noise_offset=0.0):
    """One sample's diffusion noise and timestep t ~ U(0, 1), drawn from its own seed.

    Drawn here, on the CPU in the data pipeline, rather than in the training step: the batch then
    reaches the device in one pinned, non-blocking copy with everything else, and the same sample
    gets the same noise whatever the batch size or process count (2 x b equals 1 x 2b).
    `noise_offset` adds a per-channel constant (the "offset noise" trick) to the noise.
    """
    g = torch.Generator().manual_seed(noise_seed)
    timestep = torch.rand((), generator=g)
    noise = torch.randn(shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], 1, 1, generator=g)
    return noise, timestep


def pick_caption(value, rng):
    if isinstance(value, (list, tuple)):
        choices = caption_list(value)
        return rng.choice(choices) if choices else ""
    return "" if value is None else str(value).strip()


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """What happens to a caption between the dataset and the text encoder."""

    prefix: str = ""  # prepended to every caption (a trigger word, say)
    dropout: float = 0.0  # probability of training on the empty caption instead
    shuffle_tags: bool = False  # shuffle comma-separated tags every time a sample is drawn...
    keep_tokens: int = 0  # ...except the first N, which stay in place

    def apply(self, caption, rng):
        """Prefix and tag shuffling; the caption-dropout draw comes separately (`drop`)."""
        if self.shuffle_tags:
            tags = [t.strip() for t in caption.split(",") if t.strip()]
            fixed, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            rng.shuffle(rest)
            caption = ", ".join(fixed + rest)
        return self.prefix + caption

    def drop(self, rng):
        return self.dropout > 0 and rng.random() < self.dropout


def resize_to_cover(image, size):
    """Scale so that the image covers `size` (width, height) with the least enlargement."""
    scale = upscale_needed(image.size, size)
    target = (max(size[1], round(image.size[1] * scale)), max(size[0], round(image.size[0] * scale)))
    return TF.resize(image, list(target), interpolation=InterpolationMode.BILINEAR, antialias=True)


class ImageTransform:
    """Resize, crop (centre or random) to a square of `resolution` or to a bucket's size, maybe flip, normalise."""

    def __init__(self, resolution, center_crop=False, random_flip=False):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image, rng, size=None):
        if size is None:
            tw = th = self.resolution
            image = TF.resize(to_rgb(image), self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            (tw, th), image = size, resize_to_cover(to_rgb(image), size)
        w, h = image.size
        if self.center_crop:
            top, left = (h - th) // 2, (w - tw) // 2
        else:
            top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
        image = TF.crop(image, top, left, th, tw)
        if self.random_flip and rng.random() < 0.5:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class CaptionedImages(torch.utils.data.Dataset):
    """Rows of a datasets.Dataset as {"noise", "timestep", "pixel_values", "caption"}, each row `repeats`
    times per epoch; deterministic per (seed, epoch, index)."""

    def __init__(self, dataset, image_column, caption_column, transform, seed, captions=CaptionOptions(), repeats=1, row_buckets=None,
                 latent_channels=16, noise_offset=0.0):
        self.latent_channels, self.noise_offset = latent_channels, noise_offset  # shape and offset of the drawn noise
        self.row_buckets = row_buckets  # (width, height) per row with aspect-ratio buckets, else None
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.transform = transform
        self.seed = seed
        self.captions = captions
        self.repeats = repeats
        self.epoch = 0

    def set_epoch(self, epoch):  # called by accelerate's DataLoader.set_epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset) * self.repeats

    def __getitem__(self, index):
        row = self.dataset[index % len(self.dataset)]
        rng = sample_rng(self.seed, self.epoch, index)
        noise_seed = rng.getrandbits(63)
        caption = self.captions.apply(pick_caption(row[self.caption_column], rng), rng)
        pixels = self.transform(row[self.image_column], rng, self.row_buckets[index % len(self.dataset)] if self.row_buckets else None)
        noise, timestep = sample_noise(noise_seed, (self.latent_channels, pixels.shape[-2] // 32, pixels.shape[-1] // 32), self.noise_offset)
        return {
            "noise": noise,
            "timestep": timestep,
            "pixel_values": pixels,
            "caption": "" if self.captions.drop(rng) else caption,
        }
