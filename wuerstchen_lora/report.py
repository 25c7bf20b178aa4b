"""Something to look at once a run ends: the loss curve and a grid of the last validation images,
written into the output folder and shown by the model card (README.md) on the hub.

matplotlib is optional: without it there is no loss curve (the caller prints MATPLOTLIB_NOTE);
the grid needs only PIL. Every file is written under a temporary name and renamed into place.
"""

import io
import math
import os
import re
from urllib.parse import quote

LOSS_CURVE_NAME = "loss_curve.png"
VALIDATION_GRID_NAME = "validation_grid.png"
MATPLOTLIB_NOTE = "note: matplotlib is not installed, so no loss curve was drawn; pip install matplotlib"

# validation.Validator writes validation/step-{step:06d}-{prompt index}.png (more digits past step 999999).
VALIDATION_DIR = "validation"
VALIDATION_IMAGE_RE = re.compile(r"^step-(\d+)-(\d+)\.png$")

CURVE_SIZE_INCHES, CURVE_DPI = (8.0, 4.5), 100  # 800 x 450 px
GRID_GAP, GRID_CAPTION_HEIGHT, GRID_BACKGROUND = 8, 24, (255, 255, 255)


def matplotlib_note():
    """The line the caller prints when draw_loss_curve returned None for want of matplotlib."""
    return MATPLOTLIB_NOTE


def _write_atomically(path, data):
    # Imported here: models pulls in torch and diffusers.
    from wuerstchen_lora.models import atomic_write_bytes

    atomic_write_bytes(path, data)
    return path


# ---------------------------------------------------------------- loss curve


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def _split_history(loss_history):
    """(steps, losses) of the finite entries, and the skipped steps; sorted by step, the last entry
    of a step winning (a history that holds a step twice is read as the later run's)."""
    by_step = {}
    for entry in loss_history or ():
        step, loss = int(entry[0]), entry[1]
        by_step[step] = float(loss) if _finite(loss) else None
    steps = sorted(by_step)
    kept = [s for s in steps if by_step[s] is not None]
    return kept, [by_step[s] for s in kept], [s for s in steps if by_step[s] is None]


def smooth(values, window=None):
    """Bias-corrected exponential moving average (as TensorBoard's smoothing): the early points are
    not dragged towards 0. The window defaults to a tenth of the points, between 1 and 100."""
    if window is None:
        window = min(100, max(1, len(values) // 10))
    beta = 1.0 - 1.0 / window
    out, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = beta * average + (1.0 - beta) * value
        out.append(average / (1.0 - beta ** k) if beta else value)
    return out


def use_log_scale(smoothed):
    """Log y only when the trend itself spans more than a factor of 10 (a run that starts far off
    and converges): per-step diffusion losses are noisy around a flat level, and a log axis would
    only stretch the noise near zero. All values must be positive, of course."""
    return bool(smoothed) and min(smoothed) > 0 and max(smoothed) / min(smoothed) > 10


def _y_limits(losses, smoothed, validation):
    """Limits that show the whole smoothed line and the validation points, but the raw losses only
    up to their 98th percentile: one spike would otherwise flatten everything else."""
    ordered = sorted(losses)
    high = max([ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))]] + smoothed + validation)
    low = min(ordered + validation)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def draw_loss_curve(loss_history, path, validation_loss=None):
    """A PNG of the training loss (raw per step, faint; smoothed, bold), the held-out validation
    loss as markers and skipped (non-finite) steps as ticks at the bottom; `path`, or None when
    there is nothing to draw or matplotlib is not installed (nothing is written then)."""
    steps, losses, skipped = _split_history(loss_history)
    validation = sorted((int(s), float(v)) for s, v in (validation_loss or {}).items() if _finite(v))
    if not steps and not validation:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # not pyplot: no global state, no screen
    except ImportError:
        return None
    fig = Figure(figsize=CURVE_SIZE_INCHES, dpi=CURVE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    smoothed = smooth(losses)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss (per step)")
        ax.plot(steps, smoothed, color="tab:blue", linewidth=2.0, label="training loss (smoothed)")
    if validation:
        ax.plot(*zip(*validation), "o-", color="tab:orange", markersize=5, linewidth=1.0, label="validation loss")
    if skipped:  # x in data units, y in axes units: ticks along the bottom whatever the scale
        ax.plot(skipped, [0.02] * len(skipped), "|", color="tab:red", markersize=10, transform=ax.get_xaxis_transform(),
                label=f"skipped step (non-finite loss): {len(skipped)}")
    if use_log_scale(smoothed):
        ax.set_yscale("log")
    elif steps:
        ax.set_ylim(*_y_limits(losses, smoothed, [v for _, v in validation]))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss" + (" and validation loss" if validation else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return _write_atomically(path, buffer.getvalue())


# ---------------------------------------------------------------- validation images


def last_validation_images(output_dir):
    """[(prompt index, path)] of the latest validation step's images, in prompt order; [] when none.

    Earlier steps (and a resumed run's) share the folder: only the highest step counts.
    """
    folder = os.path.join(output_dir, VALIDATION_DIR)
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = VALIDATION_IMAGE_RE.match(name)
            if m and os.path.isfile(os.path.join(folder, name)):
                found.setdefault(int(m.group(1)), []).append((int(m.group(2)), os.path.join(folder, name)))
    if not found:
        return []
    return sorted(found[max(found)])


def _default_columns(n):
    """One row up to 4 images, then close to square."""
    return n if n <= 4 else math.ceil(math.sqrt(n))


def _letterbox(image, cell):
    """`image` scaled to fit `cell` (aspect kept) and centred on the background."""
    from PIL import Image

    scale = min(cell[0] / image.width, cell[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", cell, GRID_BACKGROUND)
    canvas.paste(image.convert("RGB").resize(size, Image.LANCZOS), ((cell[0] - size[0]) // 2, (cell[1] - size[1]) // 2))
    return canvas


def _caption_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _caption(draw, font, text, box_left, top, width):
    """`text` centred under a cell, shortened with an ellipsis to fit its width."""
    text = str(text)
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 1 else ""
    left = box_left + (width - draw.textlength(text, font=font)) / 2
    draw.text((left, top + 4), text, fill=(0, 0, 0), font=font)


def _open_images(image_paths, labels):
    """The readable images with their labels (an unreadable file is left out, not fatal)."""
    from PIL import Image

    labels = list(labels) if labels is not None else [None] * len(image_paths)
    opened = []
    for image_path, label in zip(image_paths, labels):
        try:
            with Image.open(image_path) as image:
                image.load()
                opened.append((image.copy(), label))
        except OSError:
            continue
    return opened


def image_grid(image_paths, path, columns=None, labels=None, max_cell=512):
    """One PNG of the images in a grid, `path`; None (nothing written) when none can be read.

    Every cell is the largest width x the largest height among the images, scaled down so that its
    longer side is at most `max_cell` (the card stays light); each image is letterboxed into it.
    Size: columns x cell + (columns + 1) gaps wide, rows x (cell + caption strip, with `labels`)
    + (rows + 1) gaps high.
    """
    from PIL import Image, ImageDraw

    opened = _open_images(list(image_paths), labels)
    if not opened:
        return None
    columns = max(1, min(len(opened), columns or _default_columns(len(opened))))
    rows = math.ceil(len(opened) / columns)
    width, height = max(im.width for im, _ in opened), max(im.height for im, _ in opened)
    scale = min(1.0, max_cell / max(width, height)) if max_cell else 1.0
    cell = (max(1, round(width * scale)), max(1, round(height * scale)))
    caption = GRID_CAPTION_HEIGHT if labels is not None else 0
    grid = Image.new("RGB", (columns * cell[0] + (columns + 1) * GRID_GAP, rows * (cell[1] + caption) + (rows + 1) * GRID_GAP), GRID_BACKGROUND)
    draw, font = ImageDraw.Draw(grid), _caption_font() if caption else None
    for k, (image, label) in enumerate(opened):
        left = GRID_GAP + (k % columns) * (cell[0] + GRID_GAP)
        top = GRID_GAP + (k // columns) * (cell[1] + caption + GRID_GAP)
        grid.paste(_letterbox(image, cell), (left, top))
        if caption and label is not None:
            _caption(draw, font, label, left, top + cell[1], cell[0])
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return _write_atomically(path, buffer.getvalue())


# ---------------------------------------------------------------- model card


def card_images_markdown(output_dir, grid_name=VALIDATION_GRID_NAME, curve_name=LOSS_CURVE_NAME):
    """Markdown for the model card that embeds the grid and the loss curve by their path relative
    to the output folder (how the hub resolves them in README.md); only files that exist. '' if none."""
    blocks = []
    if grid_name and os.path.isfile(os.path.join(output_dir, grid_name)):
        blocks.append(f"## Validation images\n\nThe validation prompts, rendered with the LoRA at the last validation step.\n\n"
                      f"![validation images]({quote(grid_name.replace(os.sep, '/'))})\n")
    if curve_name and os.path.isfile(os.path.join(output_dir, curve_name)):
        blocks.append(f"## Training loss\n\n![training loss]({quote(curve_name.replace(os.sep, '/'))})\n")
    return "\n".join(blocks)


def card_widget(prompts, image_relpaths):
    """The hub's `widget:` card metadata: [{"text": prompt, "output": {"url": relative path}}] for
    each prompt that has an image; pass as ModelCardData(widget=...) (it keeps unknown fields)."""
    return [{"text": str(prompt), "output": {"url": relpath.replace(os.sep, "/")}}
            for prompt, relpath in zip(prompts or (), image_relpaths or ()) if relpath]


def write_card_images(output_dir, info, prompts=None):
    """Draw the loss curve and the grid of the last validation images into `output_dir`.

    Returns (markdown for the card, widget entries, notes to print). `info` is training_info.json's
    dict (loss_history, validation_loss); `prompts` the validation prompts, in order.
    """
    notes = []
    curve = draw_loss_curve(info.get("loss_history") or [], os.path.join(output_dir, LOSS_CURVE_NAME), info.get("validation_loss"))
    if curve is None and info.get("loss_history") and not _has_matplotlib():
        notes.append(MATPLOTLIB_NOTE)
    last = last_validation_images(output_dir)
    prompts = list(prompts or [])
    labels = [prompts[i] if i < len(prompts) else f"prompt {i}" for i, _ in last]
    image_grid([p for _, p in last], os.path.join(output_dir, VALIDATION_GRID_NAME), labels=labels or None)
    relpaths = [os.path.relpath(p, output_dir).replace(os.sep, "/") for _, p in last]
    known = [(prompts[i], r) for (i, _), r in zip(last, relpaths) if i < len(prompts)]  # a widget needs the real prompt
    widget = card_widget([t for t, _ in known], [r for _, r in known])
    return card_images_markdown(output_dir), widget, notes


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
