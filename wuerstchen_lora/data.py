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
import re

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from wuerstchen_lora.models import IMAGENET_MEAN, IMAGENET_STD, UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IMAGE_COLUMN_NAMES = ("image", "img", "images", "file_name", "image_path", "path", "file")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "description", "tags")


# ----------------------------------------------------------------------------------------------
# Finding the dataset


def _list_images(folder):
    """The image files under `folder`, subfolders included. Symlinked subfolders are followed like
    symlinked files (os.walk alone lists a linked folder but never enters it, so its images were
    left out without a count); a link back to a folder above it (a loop) is not entered again."""
    found, chains = [], {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        chain = chains.get(os.path.dirname(root), frozenset()) | {os.path.realpath(root)}
        chains[root] = chain
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in chain)
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def read_caption_file(path):
    """(caption, whether the file was UTF-8); a file that is not is read as Latin-1 (never fails)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").strip(), True
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip(), False


CAPTION_EXTENSIONS = (".txt", ".caption")  # kohya's --caption_extension default, and the other spelling its users have
# kohya's repeat folders: `train/10_mychar/` holds images trained 10 times per epoch.
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
FOLDER_COLUMN = "__folder__"  # the top-level folder of each row, added only when some folder is an N_name repeat folder


def normal_extension(text):
    """--caption_extension as ".ext" (kohya writes it with the dot; "txt" is accepted too)."""
    text = (text or ".txt").strip()
    return text if text.startswith(".") else "." + text


def caption_file(image, extension=".txt"):
    """The caption file of an image: same stem with `extension`, else with the other kohya spelling
    (.txt or .caption); None when there is none."""
    stem = os.path.splitext(image)[0]
    for ext in dict.fromkeys((extension,) + CAPTION_EXTENSIONS):
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


def top_folder(folder, image):
    """The first folder of `image` below the dataset `folder` ("" for an image in the folder itself)."""
    rel = os.path.relpath(image, folder)
    parts = rel.split(os.sep)
    return "" if len(parts) < 2 or parts[0] == ".." else parts[0]


def folder_repeats(name):
    """Repeats of a top-level folder by kohya's naming: `10_mychar` -> 10; other names (and the
    dataset folder itself) -> None."""
    match = REPEAT_FOLDER.match(name)
    return int(match.group(1)) if match else None


def _other_caption_extensions(images):
    """Extensions of same-stem non-image files beside the images (a hint for --caption_extension)."""
    found = {}
    stems = {os.path.splitext(p)[0] for p in images}
    for folder in {os.path.dirname(p) for p in images}:
        for name in os.listdir(folder):
            stem, ext = os.path.splitext(os.path.join(folder, name))
            if stem in stems and ext and ext.lower() not in IMAGE_EXTENSIONS and ext.lower() not in (".npz", ".json"):
                found[ext] = found.get(ext, 0) + 1
    return sorted(found, key=lambda e: -found[e])


def _caption_folder(folder, images, stats=None, extension=".txt", allow_missing=False):
    """A folder of images with same-stem caption files (`extension`, default .txt; .txt and
    .caption are both read), as a datasets.Dataset. An image without a caption file trains as the
    empty caption, like an empty file (check_captions warns or refuses); the count goes to
    `stats["missing_caption_files"]` with an example. Counts the caption files that were not UTF-8
    in `stats["non_utf8_caption_files"]` (per load: a count kept across loads would add up repeated
    loads and the held-out set)."""
    import datasets

    paths, captions, missing, non_utf8, used = [], [], [], 0, {}
    for image in images:
        txt = caption_file(image, extension)
        if txt is None:
            missing.append(os.path.relpath(image, folder))
            caption = ""
        else:
            caption, utf8 = read_caption_file(txt)
            non_utf8 += not utf8
            ext = os.path.splitext(txt)[1]
            used[ext] = used.get(ext, 0) + 1
        captions.append(caption)
        paths.append(image)
    if len(missing) == len(images) and not allow_missing:
        others = _other_caption_extensions(images)
        hint = f"; found {others[0]} files beside them: pass --caption_extension {others[0]}" if others else ""
        raise UserError(
            f"--dataset {folder}: {len(images)} images but no captions (no same-stem {' or '.join(dict.fromkeys((extension,) + CAPTION_EXTENSIONS))} "
            f"files){hint}; add a caption file beside each image or metadata.jsonl (file_name, text), caption them by name with "
            "--caption_from folder|filename, or pass --allow_missing_captions to train them all as the empty caption"
        )
    if stats is not None:
        stats["non_utf8_caption_files"] = non_utf8
        stats["missing_caption_files"] = len(missing)
        stats["missing_caption_example"] = missing[0] if missing else None
        stats["caption_files"] = used
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "text": captions}, features=features)


def add_folder_column(dataset, folder, paths, stats=None):
    """kohya's repeat folders: when a top-level folder of `folder` is named N_name, each row gets
    its top-level folder in FOLDER_COLUMN (it follows the rows through every selection) and
    `stats["folder_repeats"]` maps each folder to its repeats (1 for other folders and for images
    in `folder` itself). Unchanged when no folder is named so."""
    tops = [top_folder(folder, p) for p in paths]
    repeats = {name: folder_repeats(name) for name in sorted(set(tops))}
    if not any(r is not None for r in repeats.values()):
        return dataset
    zero = [name for name, r in repeats.items() if r == 0]
    if zero:
        raise UserError(f"--dataset {folder}: the folder {zero[0]} asks for 0 repeats (kohya's N_name folders: N repeats per epoch); "
                        "rename it with a positive N, move it out, or pass --no_folder_repeats if the name is not a repeat count")
    if stats is not None:
        stats["folder_repeats"] = {name: r or 1 for name, r in repeats.items()}
    return dataset.add_column(FOLDER_COLUMN, tops)


def row_repeats(dataset, stats):
    """Each row's repeats from its kohya N_name folder, or None when the dataset has none."""
    if FOLDER_COLUMN not in dataset.column_names or not stats.get("folder_repeats"):
        return None
    table = stats["folder_repeats"]
    return [table[name] for name in dataset[FOLDER_COLUMN]]


def folder_shares(dataset, stats, repeats=1):
    """The `data: ...` line of kohya repeat folders: each folder's images, repeats and share of the
    epoch's samples (after every selection); None without repeat folders."""
    per_row = row_repeats(dataset, stats)
    if per_row is None:
        return None
    counts = {}
    for name in dataset[FOLDER_COLUMN]:
        counts[name] = counts.get(name, 0) + 1
    total = sum(per_row) * repeats
    parts = []
    for name in sorted(counts):
        r = stats["folder_repeats"][name]
        samples = counts[name] * r * repeats
        times = f"{r} x --repeats {repeats}" if repeats != 1 else f"{r}"
        n = counts[name]
        parts.append(f"{name or '(the dataset folder itself)'} {n} image{'s' * (n != 1)} x {times} = {samples} ({100 * samples / total:.0f}%)")
    return f"data: kohya repeat folders, {total} samples per epoch: " + "; ".join(parts) + " (--no_folder_repeats if the names are no repeat counts)"


def _image_paths(dataset, column):
    """The local file of each row's image (None for images held as bytes), without decoding."""
    import datasets

    raw = dataset.cast_column(column, datasets.Image(decode=False))
    return [(v or {}).get("path") if isinstance(v, dict) else v for v in raw[column]]


def name_caption(folder, image, caption_from):
    """kohya's captions from names: "folder", the image's folder name without its repeat count
    (`10_sks dog/` -> "sks dog"); "filename", its file stem with underscores as spaces."""
    if caption_from == "folder":
        parent = os.path.basename(os.path.dirname(os.path.abspath(image)))
        match = REPEAT_FOLDER.match(parent)
        return (match.group(2) if match else parent).replace("_", " ").strip()
    return os.path.splitext(os.path.basename(image))[0].replace("_", " ").strip()


def _load_from_folder(folder, cache_dir, stats=None, extension=".txt", allow_missing=False, caption_from=None):
    import datasets

    has_metadata = any(os.path.isfile(os.path.join(folder, m)) for m in METADATA_FILES)
    if caption_from:
        if has_metadata:
            raise UserError(f"--caption_from {caption_from}: {folder} has a metadata file, whose captions would be ignored; "
                            "leave out --caption_from, or remove the metadata file")
        images = _list_images(folder)
        if not images:
            raise UserError(f"--dataset {folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        stats["caption_source"] = f"{caption_from} names"
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        return datasets.Dataset.from_dict({"image": images, "text": [name_caption(folder, p, caption_from) for p in images]}, features=features)
    if has_metadata:
        dataset = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
        if stats is not None:  # images the metadata does not list are left out by `datasets`, silently
            stats["unlisted_images"] = max(0, len(_list_images(folder)) - len(dataset))
            stats["caption_source"] = next(m for m in METADATA_FILES if os.path.isfile(os.path.join(folder, m)))
            listed = {caption_file(p, extension) for p in _list_images(folder)} - {None}
            stats["ignored_caption_files"] = len(listed)
        return dataset
    images = _list_images(folder)
    if not images:
        raise UserError(f"--dataset {folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    meta = os.path.join(folder, "meta_cap.json")
    if os.path.isfile(meta) and not any(caption_file(p, extension) for p in images):
        raise UserError(f"--dataset {folder}: its captions are in {meta}, kohya's fine-tuning metadata, which this trainer does not read; "
                        "write each caption to a same-stem .txt beside its image, or a metadata.jsonl (file_name, text) into the folder")
    if stats is not None:
        stats["caption_source"] = "caption files"
    return _caption_folder(folder, images, stats, extension, allow_missing)


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


def _load_from_hub(name, revision, cache_dir, config_name=None):
    import datasets

    try:
        return datasets.load_dataset(name, config_name, revision=revision, split="train", cache_dir=cache_dir)
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
        typed += [c for c in columns if _is_image_struct(dataset.features[c])]
        if typed:
            return typed[0]
    for name in candidates:
        if name in columns:
            return name
    kind = "image" if want_image else "caption"
    raise UserError(f"no {kind} column found; pass {flag} (the dataset has: {', '.join(columns)})")


def load_training_dataset(spec, image_column=None, caption_column=None, revision=None, cache_dir=None, stats=None, config_name=None,
                          caption_extension=".txt", allow_missing_captions=False, folder_repeats=False, caption_from=None):
    """Returns (datasets.Dataset, image column, caption column) with the image column decoded to PIL
    and the captions as text. `stats` (a dict), when given, receives what was converted or left out.
    `config_name`: a hub dataset's configuration (--dataset_config_name). A local folder's caption
    files end in `caption_extension` (or .txt/.caption); `allow_missing_captions` lets a folder
    without any train. `folder_repeats`: read kohya's N_name folders (add_folder_column).
    `caption_from` ("folder" or "filename"): a local folder's captions from names (name_caption)."""
    if not spec:
        raise UserError("--dataset is required: a hub dataset name, a local folder, or a .jsonl/.csv/.parquet file")
    stats = {} if stats is None else stats
    if os.path.isdir(spec):
        dataset = _load_from_folder(spec, cache_dir, stats, normal_extension(caption_extension), allow_missing_captions, caption_from)
    elif caption_from:
        raise UserError(f"--caption_from {caption_from} names captions after a local folder's files; --dataset {spec} is not a folder")
    elif os.path.isfile(spec):
        dataset = _load_from_file(spec, cache_dir)
    elif os.path.splitext(spec)[1].lower() in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise UserError(f"--dataset {spec}: no such file or folder")
    else:
        dataset = _load_from_hub(spec, revision, cache_dir, config_name)
    if len(dataset) == 0:
        raise UserError(f"--dataset {spec}: the dataset is empty")

    if os.path.isfile(spec):
        _refuse_kohya_metadata(spec, dataset)
    image_column = _pick_column(dataset, image_column, "--image_column", IMAGE_COLUMN_NAMES, want_image=True)
    caption_column = _pick_column(dataset, caption_column, "--caption_column", CAPTION_COLUMN_NAMES, want_image=False)
    stats["caption_column"] = caption_column
    # Relative image paths are relative to the file that lists them.
    base = os.path.dirname(os.path.abspath(spec)) if os.path.isfile(spec) else None
    dataset = _as_image_column(dataset, image_column, base)
    dataset = _captions_as_text(dataset, caption_column, stats)
    if folder_repeats and os.path.isdir(spec):
        dataset = add_folder_column(dataset, spec, _image_paths(dataset, image_column), stats)
    return dataset, image_column, caption_column


def _refuse_kohya_metadata(spec, dataset):
    """kohya's fine-tuning metadata (meta_cap.json: {image key: {"caption", "tags"}}) read as a
    .json file is one row with a column per image: refused by name instead of "no image column"."""
    if os.path.splitext(spec)[1].lower() != ".json" or len(dataset) != 1:
        return
    row = dataset[0]
    values = [v for v in row.values() if isinstance(v, dict)]
    if values and len(values) == len(row) and all(set(v) & {"caption", "tags"} for v in values):
        raise UserError(f"--dataset {spec}: this is kohya's fine-tuning metadata (meta_cap.json: image -> caption/tags), which this trainer "
                        "does not read; give the image folder with a same-stem .txt caption beside each image, or a metadata.jsonl "
                        "(one {\"file_name\": ..., \"text\": ...} per line) in that folder")


def _describe_feature(feature):
    import datasets

    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    if isinstance(feature, datasets.Image):
        return "images"
    if isinstance(feature, dict):
        return f"records ({', '.join(feature)})"
    return type(feature).__name__


def _is_image_struct(feature):
    """{bytes, path} records written without the `datasets` Image feature (plain pyarrow or pandas),
    or a column of raw image bytes."""
    import datasets

    if isinstance(feature, dict):
        return "bytes" in feature and set(feature) <= {"bytes", "path"}
    return isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")


def _as_image_column(dataset, column, base):
    """The image column as datasets.Image, whatever holds the images: paths (relative ones resolved
    against `base`), the `datasets` Image encoding, {bytes, path} records written by plain pyarrow
    or pandas (path None, a bare file name or a real path), or raw bytes. A record's bytes win over
    its path; a record without bytes is read from its path."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image) and feature.decode and base is None:
        return dataset  # a hub dataset or an imagefolder: `datasets` resolved the paths already
    if not isinstance(feature, datasets.Image):
        try:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        except (TypeError, ValueError, NotImplementedError, pa.ArrowException) as e:
            raise UserError(f"--image_column {column!r} holds {_describe_feature(feature)}, not images or image paths; "
                            f"name the image column with --image_column (the dataset has: {', '.join(dataset.column_names)})") from e
    elif feature.decode:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if base is not None:
        storage = dataset.data.column(column)
        path_only = pc.and_(pc.is_null(pc.struct_field(storage, "bytes")), pc.is_valid(pc.struct_field(storage, "path")))
        if pc.any(path_only).as_py():

            def resolve(value):
                path = value and value["path"]
                if value["bytes"] is None and path and not os.path.isabs(path) and "://" not in path:
                    return {"bytes": None, "path": os.path.join(base, path)}
                return value

            dataset = dataset.map(lambda batch: {column: [resolve(v) if v else v for v in batch[column]]}, batched=True,
                                  features=dataset.features, desc="Resolving image paths")
    return dataset.cast_column(column, datasets.Image())


def _caption_kind(feature):
    """"text", "numbers" or None (not captions) for a caption column (a list column by its items)."""
    import datasets

    inner = feature.feature if isinstance(feature, (datasets.List, datasets.LargeList)) else feature
    if not isinstance(inner, datasets.Value):
        return None
    if inner.dtype in ("string", "large_string", "null"):
        return "text"
    if inner.dtype.startswith(("int", "uint", "float", "double", "bool", "decimal")):
        return "numbers"
    return None


def _number_as_text(value):
    """42 -> "42", 3.0 -> "3" (pandas turns integer columns with gaps into floats), 2.5 -> "2.5";
    None and NaN stay missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _captions_as_text(dataset, column, stats=None):
    """Captions as strings: a column of numbers (a .csv/.jsonl of numeric labels, say) would
    otherwise be read as missing by the cache and as text by the uncached path. Counts the
    converted captions in `stats["numeric_captions"]` (with an example)."""
    import datasets

    feature = dataset.features[column]
    kind = _caption_kind(feature)
    if kind is None:
        raise UserError(f"--caption_column {column!r} holds {_describe_feature(feature)}, not text; "
                        f"name the caption column with --caption_column (the dataset has: {', '.join(dataset.column_names)})")
    if kind == "text":
        return dataset
    is_list = not isinstance(feature, datasets.Value)
    features = dataset.features.copy()
    features[column] = datasets.List(datasets.Value("string")) if is_list else datasets.Value("string")

    def convert(value):
        if is_list:
            return None if value is None else [t for t in map(_number_as_text, value) if t is not None]
        return _number_as_text(value)

    dataset = dataset.map(lambda batch: {column: [convert(v) for v in batch[column]]}, batched=True, features=features,
                          desc="Captions: numbers to text")
    converted = [v for v in dataset[column] if v]
    if stats is not None:
        stats["numeric_captions"] = len(converted)
        stats["numeric_caption_dtype"] = str(getattr(feature, "feature", feature).dtype)
        stats["numeric_caption_example"] = (converted[0][0] if is_list else converted[0]) if converted else None
    return dataset


# ----------------------------------------------------------------------------------------------
# Checking every image once, before training

MIN_IMAGE_SIDE = 32  # one EfficientNet cell; anything smaller is upscaled into mush


def set_max_image_pixels(limit):
    """--max_image_pixels N: images of more than N pixels are refused as possible decompression
    bombs (PIL refuses over twice Image.MAX_IMAGE_PIXELS and warns over once: with the flag given
    the limit is N itself, without the warning). None keeps PIL's limit, 0 lifts it. Set in the main
    process before any image is opened; dataloader workers fork from it and inherit it."""
    import warnings

    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit / 2 if limit else None
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def bomb_reason(data, path):
    """Why PIL refused an image as a decompression bomb: its size, the limit and the flag that raises it."""
    pixels = None
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the header only, to read the size
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            pixels, size = image.size[0] * image.size[1], f"{image.size[0]}x{image.size[1]}"
    except Exception:  # the size is only a courtesy
        pass
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    limit = int(2 * previous)
    shown = f"{size} = {pixels:,} pixels, " if pixels else ""
    return (f"too many pixels ({shown}more than PIL's decompression-bomb limit of {limit:,}); if you trust the file, "
            f"pass --max_image_pixels {pixels or 2 * limit} (0: no limit), or shrink it")


def inspect_image(value):
    """(problem or None, (width, height) as displayed) for an undecoded image value ({"bytes", "path"} or a path)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = None, value
    if data is None and not path:
        return "no image (an empty value in the image column)", None
    try:
        if data is None and os.path.getsize(path) == 0:
            return "empty file", None
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            w, h = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                w, h = h, w
    except FileNotFoundError:
        return "file not found", None
    except Image.DecompressionBombError:
        return bomb_reason(data, path), None
    except Image.UnidentifiedImageError:
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


class EpochRows:
    """Sample index -> dataset row over one epoch: each row `per_row[i]` times (kohya's N_name
    folders; None: once each), the whole `repeats` (--repeats) times. Sample k of a pass is row k
    when every row appears once, so that plain runs draw what they always drew; a row's copies are
    neighbours in the index and differ, like --repeats copies, by their sample plans. No list of
    the epoch is built (an epoch may be huge): the index is found by bisection."""

    def __init__(self, rows, repeats=1, per_row=None):
        from wuerstchen_lora.flags import check_epoch_size

        if per_row is not None and len(per_row) != rows:
            raise ValueError(f"{len(per_row)} repeat counts for {rows} rows")
        self.rows, self.repeats = rows, repeats
        self.per_row = None if per_row is None or all(r == 1 for r in per_row) else [int(r) for r in per_row]
        self.ends = None if self.per_row is None else np.cumsum(self.per_row)
        self.per_pass = rows if self.per_row is None else int(self.ends[-1])
        # The sampler's shuffled order of the epoch must fit, before it is built.
        if self.per_row is None:
            check_epoch_size(rows, repeats)
        else:
            from wuerstchen_lora.flags import ORDER_BYTES_PER_SAMPLE, machine_memory, refuse_size

            refuse_size(f"kohya repeat folders: an epoch of {self.per_pass:,} samples per pass x --repeats {repeats}, whose shuffled order",
                        self.per_pass * repeats * ORDER_BYTES_PER_SAMPLE, machine_memory(), "this machine's memory",
                        "lower the N of the N_name folders or --repeats (more passes: --num_train_epochs), or pass --no_folder_repeats")

    def __len__(self):
        return self.per_pass * self.repeats

    def row(self, index):
        offset = index % self.per_pass
        return offset if self.ends is None else int(np.searchsorted(self.ends, offset, side="right"))

    def pass_rows(self):
        """The row of each sample of one pass, as an array (row(k) for k < per_pass)."""
        return np.arange(self.rows) if self.per_row is None else np.repeat(np.arange(self.rows), self.per_row)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches drawn from one bucket at a time, every batch full (a bucket's last batch is topped up
    with other images of that bucket), in an order fixed by (seed, epoch)."""

    def __init__(self, row_buckets, batch_size, seed, repeats=1, per_row=None):
        self.row_buckets, self.batch_size, self.seed, self.repeats = row_buckets, batch_size, seed, repeats
        self.index = EpochRows(len(row_buckets), repeats, per_row)  # the same sample -> row map as the dataset's
        self.drop_last = False  # read by accelerate when it shards the batches between processes
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _groups(self):
        groups, rows, per_pass = {}, self.index.pass_rows().tolist(), self.index.per_pass
        for i in range(len(self.index)):
            groups.setdefault(self.row_buckets[rows[i % per_pass]], []).append(i)
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


def describe_effective_batch(samples, batch_size, processes, accumulation, batches_per_epoch, padded=False):
    """The "effective batch ..." part of the start-up line, true also for a dataset smaller than one
    batch or one accumulation window.

    `samples` per epoch (rows x repeats), `batches_per_epoch` per process (the prepared DataLoader's
    length). accelerate ends an accumulation window at the end of every epoch (windows never span
    epochs): an epoch shorter than a window gives one update per epoch over all its samples, and an
    epoch that is not a whole number of windows ends with a smaller update. `padded`: batches are
    topped up with repeated samples (several processes, or aspect-ratio buckets), so every micro-batch
    is full and only the number of micro-batches in a window varies.
    """
    formula = f"{batch_size} x {processes} processes x {accumulation} accumulation"
    nominal = batch_size * processes * accumulation
    windows = math.ceil(batches_per_epoch / accumulation)
    drawn = batches_per_epoch * batch_size * processes if padded else samples  # per epoch, repeats included
    if windows == 1 and min(drawn, samples) < nominal:
        topped = f" (topped up to {drawn} with repeats)" if drawn > samples else ""
        return (f"effective batch {samples}{topped}, capped by the dataset: {samples} sample{'s' * (samples != 1)} per epoch, "
                f"fewer than {formula} = {nominal}; each update takes one whole epoch")
    text = f"effective batch {nominal} ({formula})"
    last = drawn - (windows - 1) * nominal
    if 0 < last < nominal:
        text += f"; the last update of each epoch takes the remaining {last} samples (accumulation windows end with the epoch)"
    return text


def caption_list(value):
    """The non-empty captions of a row's caption value (one string or a list), stripped. Numbers
    count as their text, as load_training_dataset converts them (the cache and the uncached path
    must agree on what a caption is)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    values = [_number_as_text(v) if isinstance(v, (int, float)) else v for v in values]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def caption_stats(dataset, caption_column, tokenizer=None, prefix=""):
    """Counts of empty captions and of captions longer than the text encoder's 77 tokens (with
    --caption_prefix in front, as the text encoder gets them)."""
    empty = long = 0
    limit = getattr(tokenizer, "model_max_length", 77)
    for value in dataset[caption_column]:
        texts = caption_list(value)
        empty += not texts
        if tokenizer is not None and texts:
            long += any(len(ids) > limit for ids in tokenizer([prefix + t for t in texts]).input_ids)
    return {"empty_captions": empty, "long_captions": long}


def check_captions(dataset, caption_column, spec, allow_missing=False, missing_file=None, caption_files=False):
    """Refuses a dataset whose captions are mostly missing or empty (null in a .jsonl/.parquet, blank
    in a .csv, missing or empty caption files, a column of the wrong name or kind): such a run trains
    a mostly unconditional LoRA and would end with exit status 0. Returns a warning line, or None,
    for fewer missing captions (or more, with `allow_missing`). `caption_files`: a folder of images
    with caption files, `missing_file` one of its images without one, for the message."""
    missing = sum(not caption_list(value) for value in dataset[caption_column])
    if not missing:
        return None
    if caption_files or missing_file is not None:
        example = f"; e.g. {missing_file} has none" if missing_file else ""
        share = f"{missing} of {len(dataset)} captions are missing or empty (images without a caption file or with an empty one{example})"
        fix = "add the caption files (or name their extension with --caption_extension)"
    else:
        share = f"{missing} of {len(dataset)} captions (column {caption_column!r}) are missing or empty"
        fix = "name the right column with --caption_column"
    if 2 * missing > len(dataset) and not allow_missing:
        raise UserError(f"--dataset {spec}: {share}, so the LoRA would learn mostly without captions; fix the captions, "
                        f"{fix}, or pass --allow_missing_captions to train them as the empty caption")
    return f"warning: {share}; those images train as the empty (unconditional) caption"


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
    """A random source for one sample in one epoch (read by `sample_plan` only).

    Crops, flips, caption choices and the sample's diffusion noise and timestep come from
    (seed, epoch, index) alone, so a resumed run, or a run with another worker or process count,
    sees exactly the same samples. torchvision's random
    transforms draw from the global RNG, which does not give that; hence the hand-written choices.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Every random choice for one sample in one epoch. The uncached path (pixels) and the cached
    path (embeddings on the 32 px lattice) both take their choices from here, so with the same seed
    they flip, pick, drop and shuffle the same captions and draw the same noise."""

    noise_seed: int  # seed of the sample's diffusion noise and timestep (sample_noise)
    caption_index: int  # which of the row's captions (a list column; the cache's "<row>.<j>")
    drop_caption: bool  # caption dropout: train on the empty caption
    tag_seed: int  # order of the shuffled tags (CaptionOptions.apply)
    flip: bool  # mirror left-right (never without --random_flip)
    crop: tuple  # (top, left) in [0, 1): the crop's place in the free range, as a fraction

    def crop_offset(self, free_h, free_w):
        """(top, left) of the crop in the unflipped image, given how far it can move (pixels for
        the uncached path, grid cells for the cached one). Each offset 0..free is equally likely,
        and a pixel offset on the lattice (32 x k) gives cell k for the same fraction."""
        return tuple(min(int(f * (free + 1)), free) for f, free in zip(self.crop, (free_h, free_w)))


def sample_plan(seed, epoch, index, captions=1, dropout=0.0, random_flip=False):
    """The plan of sample `index` in `epoch`: `captions` is how many captions the row has,
    `dropout` the caption-dropout probability. Centre crops are a setting, not a draw: the
    transform centres the crop, and the cache holds centre crops (nothing left to move)."""
    rng = sample_rng(seed, epoch, index)
    # Every value is drawn every time, in this order, each with a fixed number of draws (no
    # randrange, whose draw count depends on its range): turning one option on, or a row with more
    # captions, leaves the other choices as they were.
    noise_seed = rng.getrandbits(63)
    caption, drop = rng.random(), rng.random()
    tag_seed = rng.getrandbits(63)
    flip = rng.random()
    crop = (rng.random(), rng.random())
    captions = max(1, captions)
    return SamplePlan(noise_seed=noise_seed, caption_index=min(int(caption * captions), captions - 1),
                      drop_caption=dropout > 0 and drop < dropout, tag_seed=tag_seed,
                      flip=bool(random_flip) and flip < 0.5, crop=crop)


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


def caption_count(value):
    """How many captions a row's caption value offers (an empty one counts as the empty caption)."""
    return len(caption_list(value)) or 1


def pick_caption(value, index=0):
    """Caption `index` (a plan's caption_index; None: the first) of a row's caption value."""
    return (caption_list(value) or [""])[index or 0]


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """What happens to a caption between the dataset and the text encoder."""

    prefix: str = ""  # prepended to every caption (a trigger word, say)
    dropout: float = 0.0  # probability of training on the empty caption instead
    shuffle_tags: bool = False  # shuffle comma-separated tags every time a sample is drawn...
    keep_tokens: int = 0  # ...except the first N, which stay in place

    def apply(self, caption, tag_seed=0):
        """Prefix and tag shuffling (in the order of a plan's tag_seed); dropout is the plan's."""
        if self.shuffle_tags:
            tags = [t.strip() for t in caption.split(",") if t.strip()]
            fixed, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            random.Random(tag_seed).shuffle(rest)
            caption = ", ".join(fixed + rest)
        return self.prefix + caption


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

    def __call__(self, image, plan=None, size=None):
        """`plan` (a SamplePlan) places the random crop and says whether to flip; None for centre
        crops without flips."""
        if size is None:
            tw = th = self.resolution
            image = TF.resize(to_rgb(image), self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            (tw, th), image = size, resize_to_cover(to_rgb(image), size)
        w, h = image.size
        if self.center_crop:  # torchvision's centre, as the cache crops it (image_for_cache)
            image = TF.center_crop(image, [th, tw])
        else:
            top, left = plan.crop_offset(h - th, w - tw)
            image = TF.crop(image, top, left, th, tw)
        if self.random_flip and plan is not None and plan.flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class CaptionedImages(torch.utils.data.Dataset):
    """Rows of a datasets.Dataset as {"noise", "timestep", "pixel_values", "caption"}, each row `repeats`
    times per epoch (times its own count in `per_row`, kohya's repeat folders); deterministic per
    (seed, epoch, index)."""

    def __init__(self, dataset, image_column, caption_column, transform, seed, captions=CaptionOptions(), repeats=1, row_buckets=None,
                 latent_channels=16, noise_offset=0.0, per_row=None):
        self.index = EpochRows(len(dataset), repeats, per_row)  # checks that the epoch's shuffled order fits
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
        return len(self.index)

    def __getitem__(self, index):
        i = self.index.row(index)
        row = self.dataset[i]
        value = row[self.caption_column]
        plan = sample_plan(self.seed, self.epoch, index, caption_count(value), self.captions.dropout, self.transform.random_flip)
        caption = "" if plan.drop_caption else self.captions.apply(pick_caption(value, plan.caption_index), plan.tag_seed)
        pixels = self.transform(row[self.image_column], plan, self.row_buckets[i] if self.row_buckets else None)
        noise, timestep = sample_noise(plan.noise_seed, (self.latent_channels, pixels.shape[-2] // 32, pixels.shape[-1] // 32), self.noise_offset)
        return {"noise": noise, "timestep": timestep, "pixel_values": pixels, "caption": caption}
