"""Embedding cache: EfficientNet and CLIP run once per image and caption, not once per step.

Layout of one cache folder (`<cache dir>/<key>/`):
    images-RRR.safetensors   per-image EfficientNet embeddings written by process RRR: "<i>" and,
                             with --random_flip, "<i>.flip" (the flipped image, encoded: EfficientNet
                             is not flip-equivariant)
    texts-RRR.safetensors    "<i>.<j>": CLIP last_hidden_state of caption j of image i
    empty.safetensors        the empty caption's embedding (caption dropout, unconditional)
    manifest.json            written last: a folder without it is incomplete and never read

The key hashes everything that changes the content: dataset identity and files, columns, selection,
resolution, crop and flip settings, encoder and text-encoder weights, tokenizer and dtype.

Each embedding is stored per image, with its own grid size, so that later aspect-ratio buckets fit.
With --random_crop the image is resized (short side = resolution), its long side trimmed to a
multiple of 32 and encoded whole; each epoch a random resolution/32-cell window of that grid is
taken. That is a crop on the 32 px lattice, and the window's border cells saw their neighbours
through EfficientNet's receptive field; pass --no_cache_embeddings for pixel-exact random crops.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from wuerstchen_lora.data import (
    CaptionOptions,
    EpochRows,
    caption_count,
    caption_list,
    pick_caption,
    resize_to_cover,
    sample_noise,
    sample_plan,
    to_rgb,
)
from wuerstchen_lora.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    atomic_save_tensors,
    atomic_write_json,
)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------
# Key


def stat_digest(path):
    """Names, sizes and modification times of a local file or of every file under a folder."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                st = os.stat(full)
                h.update(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:  # a hub id: its revision is part of the key, the dataset fingerprint covers the rest
        h.update(path.encode())
    return h.hexdigest()


def cache_key(model, data, dataset, columns, dtype, image_encoder_path, source=None):
    """The cache folder's name: a digest of everything the cached embeddings depend on. `model`:
    ModelConfig, `data`: DataConfig, `columns`: the (image, caption) columns in use, `source`: the
    dataset's name or path (default --dataset)."""
    prior, source = model.pretrained_prior_model_name_or_path, source or data.dataset
    parts = {
        "format": CACHE_FORMAT,
        "dataset": source,
        "dataset_files": stat_digest(source),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "rows": len(dataset),
        "columns": list(columns),
        "resolution": data.resolution,
        "center_crop": data.center_crop,
        "random_flip": data.random_flip,
        "buckets": [data.aspect_ratio_buckets, data.bucket_max_upscale],
        "image_encoder": stat_digest(image_encoder_path),
        "text_encoder": [prior, model.revision] + [stat_digest(os.path.join(prior, sub)) for sub in ("text_encoder", "tokenizer")],
        "dtype": str(dtype),
        "texts": None if data.shuffle_tags else data.caption_prefix,  # cached texts include the prefix
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Building


def image_for_cache(image, resolution, center_crop, bucket=None):
    """Resize so the image covers the square (short side = `resolution`) or its bucket; centre-crop
    to it, or (random-crop mode) trim each side to a multiple of 32 so that the whole image is
    encoded on the lattice and windows of the target grid can be taken from it."""
    if bucket is None:
        image = TF.resize(to_rgb(image), resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        target = (resolution, resolution)
    else:
        image, target = resize_to_cover(to_rgb(image), bucket), bucket
    w, h = image.size
    tw, th = target if center_crop else (w // 32 * 32, h // 32 * 32)
    return TF.center_crop(image, [th, tw])


def encoder_pixels(image):
    """A PIL image as EfficientNet's normalised input, [1, 3, H, W]."""
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)[None]


def _captions(value):
    """Every caption of a row (one string or a list); the sampler picks one per epoch."""
    return caption_list(value) or [""]


class _RowsToEncode(torch.utils.data.Dataset):
    """This process's rows as (index, pixels, flipped pixels or None, captions): decoded and resized in
    DataLoader workers while the encoders run on earlier batches."""

    def __init__(self, dataset, indices, columns, data, captions, row_buckets):
        self.dataset, self.indices = dataset, list(indices)
        self.image_column, self.caption_column = columns
        self.resolution, self.center_crop, self.random_flip = data.resolution, data.center_crop, data.random_flip
        self.captions, self.row_buckets = captions, row_buckets

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        row = self.dataset[i]
        image = image_for_cache(row[self.image_column], self.resolution, self.center_crop, self.row_buckets[i] if self.row_buckets else None)
        flipped = encoder_pixels(TF.hflip(image))[0] if self.random_flip else None
        texts = None if self.captions.shuffle_tags else [self.captions.prefix + c for c in _captions(row[self.caption_column])]
        return i, encoder_pixels(image)[0], flipped, texts


def _encode_batch(items, encode_image, encode_text, images, texts):
    """Encode a list of decoded rows: images of one size in one EfficientNet call (flips alongside),
    every caption of the batch in one CLIP call. Buckets and random-crop mode give mixed sizes."""
    by_size = {}
    for i, straight, flipped, _ in items:
        group = by_size.setdefault(tuple(straight.shape), {})
        group[str(i)] = straight
        if flipped is not None:
            group[f"{i}.flip"] = flipped
    for group in by_size.values():
        for name, embedding in zip(group, encode_image(torch.stack(list(group.values())))):
            images[name] = embedding.cpu().contiguous()
    names, captions = [], []
    for i, _, _, row_captions in items:
        for j, caption in enumerate(row_captions or []):
            names.append(f"{i}.{j}")
            captions.append(caption)
    if captions:
        for name, embedding in zip(names, encode_text(captions)):
            texts[name] = embedding.cpu().contiguous()


def build_cache(folder, dataset, columns, data, cache, encode_image, encode_text, accelerator, captions=CaptionOptions(), row_buckets=None):
    """Encode this process's share of the dataset into `folder` (once), then wait for the others.

    `columns`: (image column, caption column); `data`: DataConfig; `cache`: CacheConfig.
    encode_image(pixels [n,3,H,W]) -> [n,16,h,w]; encode_text(list of str) -> [n,77,d]. Rows are
    decoded by --dataloader_num_workers workers and encoded --cache_batch_size at a time.
    """
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        accelerator.print(f"reusing embedding cache {folder}")
        return folder
    os.makedirs(folder, exist_ok=True)
    images, texts = {}, {}
    rows = _RowsToEncode(dataset, range(rank, len(dataset), world), columns, data, captions, row_buckets)
    loader = torch.utils.data.DataLoader(rows, batch_size=cache.cache_batch_size, num_workers=data.dataloader_num_workers, collate_fn=list)
    with tqdm(total=len(rows), desc="caching embeddings", disable=not accelerator.is_local_main_process) as bar:
        for items in loader:
            _encode_batch(items, encode_image, encode_text, images, texts)
            bar.update(len(items))
    atomic_save_tensors(images, os.path.join(folder, f"images-{rank:03d}.safetensors"))
    atomic_save_tensors(texts, os.path.join(folder, f"texts-{rank:03d}.safetensors"))
    if accelerator.is_main_process:
        atomic_save_tensors({"empty": encode_text([""])[0].cpu().contiguous()}, os.path.join(folder, "empty.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The training grid (height, width in cells) of each row: the square, or the row's bucket.
        grids = [[b[1] // 32, b[0] // 32] for b in row_buckets] if row_buckets else None
        atomic_write_json(os.path.join(folder, MANIFEST), {"format": CACHE_FORMAT, "rows": len(dataset), "shards": world, "grids": grids})
    accelerator.wait_for_everyone()
    return folder


# ----------------------------------------------------------------------------------------------
# Reading


class CachedExamples(torch.utils.data.Dataset):
    """Samples from a complete cache: {"noise", "timestep", "image_embeddings", and "text_embeddings" or,
    when tags are shuffled (the text differs every epoch), the "caption" to encode}.

    Crop window, flip, caption choice, caption dropout, tag order and noise come from the same
    `sample_plan` as the uncached path's; each row appears `repeats` times per epoch (times its own count in
    `per_row`, kohya's repeat folders).
    """

    def __init__(self, folder, resolution, random_flip, seed, captions=CaptionOptions(), raw_captions=None, repeats=1, noise_offset=0.0, per_row=None):
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        self.folder, self.rows, self.shards = folder, manifest["rows"], manifest["shards"]
        # Sample -> row, with each row's own repeats (kohya's folders) as in the uncached path; checks the epoch fits.
        self.index = EpochRows(self.rows, repeats, per_row)
        self.grids = manifest.get("grids") or [[resolution // 32, resolution // 32]] * self.rows
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0
        self.captions, self.raw_captions, self.repeats = captions, raw_captions, repeats
        self.noise_offset = noise_offset
        if captions.shuffle_tags and raw_captions is None:
            raise ValueError("shuffled tags need the raw captions")
        self._files = {}  # opened lazily: safe_open handles do not survive pickling into workers
        self._caption_counts = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def _file(self, name):
        if name not in self._files:
            self._files[name] = safe_open(os.path.join(self.folder, name), framework="pt")
        return self._files[name]

    def caption_count(self, row):
        if self._caption_counts is None:
            counts = {}
            for shard in range(self.shards):
                for key in self._file(f"texts-{shard:03d}.safetensors").keys():
                    i = int(key.split(".")[0])
                    counts[i] = counts.get(i, 0) + 1
            self._caption_counts = counts
        return self._caption_counts[row]

    def empty_text(self):
        return self._file("empty.safetensors").get_tensor("empty")

    def _text(self, row, plan):
        if self.captions.shuffle_tags:  # the text changes every epoch: the training loop encodes it
            caption = self.captions.apply(pick_caption(self.raw_captions[row], plan.caption_index), plan.tag_seed)
            return "caption", "" if plan.drop_caption else caption
        if plan.drop_caption:
            return "text_embeddings", self.empty_text()
        return "text_embeddings", self._file(f"texts-{row % self.shards:03d}.safetensors").get_tensor(f"{row}.{plan.caption_index}")

    def __getitem__(self, index):
        row = self.index.row(index)
        captions = caption_count(self.raw_captions[row]) if self.captions.shuffle_tags else self.caption_count(row)
        plan = sample_plan(self.seed, self.epoch, index, captions, self.captions.dropout, self.random_flip)
        image = self._file(f"images-{row % self.shards:03d}.safetensors").get_tensor(f"{row}.flip" if plan.flip else str(row))
        h, w = image.shape[-2:]
        gh, gw = self.grids[row]
        top, left = plan.crop_offset(h - gh, w - gw)
        if plan.flip:  # the plan places the crop in the unflipped image; this grid is mirrored
            left = w - gw - left
        text_key, text = self._text(row, plan)
        noise, timestep = sample_noise(plan.noise_seed, (image.shape[0], gh, gw), self.noise_offset)
        return {
            "noise": noise,
            "timestep": timestep,
            "image_embeddings": image[:, top : top + gh, left : left + gw].contiguous(),
            text_key: text,
        }
