"""The loss curve, the grid of the last validation images and what the model card says of them."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from wuerstchen_lora import report

BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)  # matplotlib's tab: colours, as drawn


def pixels_near(path, colour, tolerance=12):
    """How many pixels of the PNG are within `tolerance` of `colour` on every channel."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= tolerance).sum())


def decaying_history(n=200, skip_every=None):
    rng = np.random.default_rng(0)
    history = []
    for step in range(1, n + 1):
        loss = float((1.5 * np.exp(-step / 40) + 0.2) * rng.uniform(0.6, 1.4))
        history.append([step, None if skip_every and step % skip_every == 0 else loss])
    return history


def no_temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")] == []


# ---------------------------------------------------------------- loss curve


def test_loss_curve_is_a_real_png(tmp_path):
    pytest.importorskip("matplotlib")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    path = tmp_path / "loss_curve.png"
    assert report.draw_loss_curve(decaying_history(), str(path)) == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        lo, hi = image.convert("L").getextrema()
    assert hi - lo > 100  # not one colour: dark lines on white
    assert pixels_near(path, BLUE) > 500  # the smoothed line
    assert pixels_near(path, ORANGE) == 0 and pixels_near(path, RED) == 0  # no validation, nothing skipped
    assert no_temporaries(tmp_path)
    if not pyplot_before:  # Figure directly: pyplot's global state is never set up
        assert "matplotlib.pyplot" not in sys.modules


def test_loss_curve_tolerates_skipped_steps_and_marks_them(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    history = decaying_history(skip_every=25)
    history += [[201, float("nan")], [202, float("inf")]]  # non-finite values read as skipped too
    assert report.draw_loss_curve(history, str(path)) == str(path)
    assert pixels_near(path, RED) > 20  # the ticks of the skipped steps


def test_loss_curve_validation_markers(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    validation = {"50": 0.5, "100": 0.3, "150": float("nan"), "200": 0.25}
    assert report.draw_loss_curve(decaying_history(), str(path), validation) == str(path)
    assert pixels_near(path, ORANGE) > 100
    # Validation alone (every training step skipped) still draws.
    only = tmp_path / "only.png"
    assert report.draw_loss_curve([[1, None], [2, None]], str(only), {"2": 0.4}) == str(only)
    assert pixels_near(only, ORANGE) > 20
    # A non-finite validation loss is left out (as an axis limit it would stop the drawing).
    assert report.draw_loss_curve(decaying_history(), str(path), {"50": float("inf")}) == str(path)


def test_loss_curve_replaces_an_old_file_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    path.write_bytes(b"old")
    report.draw_loss_curve(decaying_history(50), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and no_temporaries(tmp_path)


def test_nothing_to_draw_gives_none(tmp_path):
    path = tmp_path / "curve.png"
    assert report.draw_loss_curve([], str(path)) is None
    assert report.draw_loss_curve(None, str(path), {}) is None
    assert report.draw_loss_curve([[1, None], [2, float("nan")]], str(path)) is None
    assert os.listdir(tmp_path) == []


def test_without_matplotlib_no_curve_and_nothing_written(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of any of them raises ImportError
    path = tmp_path / "curve.png"
    assert report.draw_loss_curve(decaying_history(), str(path), {"10": 0.5}) is None
    assert os.listdir(tmp_path) == []
    assert "pip install matplotlib" in report.MATPLOTLIB_NOTE and report.matplotlib_note() == report.MATPLOTLIB_NOTE


def test_history_is_sorted_deduplicated_and_split():
    steps, losses, skipped = report._split_history([[3, 0.3], [1, 0.1], [2, None], [3, 0.35], [4, float("inf")]])
    assert steps == [1, 3] and losses == [0.1, 0.35] and skipped == [2, 4]


def test_smoothing_and_log_scale_choice():
    assert report.smooth([2.0] * 50) == pytest.approx([2.0] * 50)  # bias-corrected: no ramp up from 0
    assert report.smooth([1.0, 3.0], window=1) == [1.0, 3.0]
    noisy = report.smooth([0.5 + 0.4 * (-1) ** k for k in range(100)], window=10)
    assert max(noisy[20:]) - min(noisy[20:]) < 0.2  # the noise is damped
    assert report.use_log_scale([5.0, 1.0, 0.3])  # a trend over a factor of 10
    assert not report.use_log_scale([0.6, 0.4, 0.3])  # flat: linear
    assert not report.use_log_scale([5.0, 0.0]) and not report.use_log_scale([])


# ---------------------------------------------------------------- grid


def make_images(folder, sizes):
    paths = []
    for k, size in enumerate(sizes):
        path = folder / f"im{k}.png"
        Image.new("RGB", size, (40 * k, 200 - 30 * k, 90)).save(path)
        paths.append(str(path))
    return paths


def test_grid_of_mixed_sizes_has_the_expected_dimensions(tmp_path):
    paths = make_images(tmp_path, [(64, 64), (100, 50), (40, 80), (64, 64), (30, 30)])
    out = tmp_path / "grid.png"
    assert report.image_grid(paths, str(out), columns=3) == str(out)
    gap = report.GRID_GAP
    with Image.open(out) as grid:  # cells of 100 x 80 (the largest width, the largest height), 3 x 2
        assert grid.format == "PNG" and grid.size == (3 * 100 + 4 * gap, 2 * 80 + 3 * gap)
        rgb = grid.convert("RGB")
        # Image 2 (40 x 80) sits in the middle of cell (2, 0), letterboxed by background left and right.
        left, top = gap + 2 * (100 + gap), gap
        assert rgb.getpixel((left + 50, top + 40)) == (80, 140, 90)
        assert rgb.getpixel((left + 5, top + 40)) == report.GRID_BACKGROUND
        # Image 1 (100 x 50) fills its cell's width, with bars above and below.
        left = gap + 100 + gap
        assert rgb.getpixel((left + 2, top + 40)) == (40, 170, 90)
        assert rgb.getpixel((left + 50, top + 3)) == report.GRID_BACKGROUND
        assert rgb.getpixel((gap + 2 * (100 + gap) + 50, gap + 80 + gap + 40)) == report.GRID_BACKGROUND  # the empty 6th cell
    with_labels = tmp_path / "labelled.png"
    report.image_grid(paths, str(with_labels), columns=2, labels=["a"] * 5)
    with Image.open(with_labels) as grid:
        assert grid.size == (2 * 100 + 3 * gap, 3 * (80 + report.GRID_CAPTION_HEIGHT) + 4 * gap)
    assert no_temporaries(tmp_path)


def test_grid_default_columns_and_cell_cap(tmp_path):
    paths = make_images(tmp_path, [(1024, 512)] * 3)
    out = tmp_path / "grid.png"
    report.image_grid(paths, str(out))  # up to 4 images: one row; cells capped at 512 on the long side
    with Image.open(out) as grid:
        assert grid.size == (3 * 512 + 4 * report.GRID_GAP, 256 + 2 * report.GRID_GAP)
    assert report._default_columns(9) == 3 and report._default_columns(5) == 3 and report._default_columns(4) == 4
    report.image_grid(paths[:2], str(out), columns=10, max_cell=None)  # more columns than images: as many as images
    with Image.open(out) as grid:
        assert grid.size == (2 * 1024 + 3 * report.GRID_GAP, 512 + 2 * report.GRID_GAP)


def test_grid_without_images_or_with_unreadable_ones(tmp_path):
    out = tmp_path / "grid.png"
    assert report.image_grid([], str(out)) is None
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert report.image_grid([str(broken), str(tmp_path / "missing.png")], str(out)) is None
    assert not out.exists()
    good = make_images(tmp_path, [(20, 10)])
    assert report.image_grid([str(broken)] + good, str(out), labels=["bad", "good"]) == str(out)
    with Image.open(out) as grid:  # one cell: the broken file is left out with its label
        assert grid.size == (20 + 2 * report.GRID_GAP, 10 + report.GRID_CAPTION_HEIGHT + 2 * report.GRID_GAP)


# ---------------------------------------------------------------- validation images and the card


def touch_validation(output_dir, names):
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"png")
    return folder


def test_last_validation_images_are_the_latest_steps_in_prompt_order(tmp_path):
    folder = touch_validation(tmp_path, [f"step-000100-{i}.png" for i in range(3)]
                              + [f"step-000200-{i}.png" for i in (11, 2, 10, 0, 1, 3, 4, 5, 6, 7, 8, 9)]
                              + [".tmp-abcdef-step-000300-0.png", "step-000300-0.png.part", "notes.txt"])
    found = report.last_validation_images(str(tmp_path))
    assert [i for i, _ in found] == list(range(12))  # numeric order: 10 after 9
    assert found[0][1] == str(folder / "step-000200-0.png") and found[11][1] == str(folder / "step-000200-11.png")
    touch_validation(tmp_path, ["step-1000000-0.png"])  # past six digits the step just grows
    assert report.last_validation_images(str(tmp_path)) == [(0, str(folder / "step-1000000-0.png"))]
    assert report.last_validation_images(str(tmp_path / "nowhere")) == []


def test_card_markdown_mentions_only_files_that_exist(tmp_path):
    assert report.card_images_markdown(str(tmp_path), "validation_grid.png", "loss_curve.png") == ""
    (tmp_path / "loss_curve.png").write_bytes(b"png")
    text = report.card_images_markdown(str(tmp_path), "validation_grid.png", "loss_curve.png")
    assert "](loss_curve.png)" in text and "validation_grid" not in text
    (tmp_path / "validation_grid.png").write_bytes(b"png")
    text = report.card_images_markdown(str(tmp_path), "validation_grid.png", "loss_curve.png")
    assert "![validation images](validation_grid.png)" in text and "![training loss](loss_curve.png)" in text
    assert text.index("validation_grid.png") < text.index("loss_curve.png")


def test_card_widget_is_accepted_by_model_card_data():
    from huggingface_hub import ModelCard, ModelCardData

    widget = report.card_widget(["a red circle", "a blue square", "no image"], ["validation/step-000030-0.png", "validation/step-000030-1.png"])
    assert widget == [{"text": "a red circle", "output": {"url": "validation/step-000030-0.png"}},
                      {"text": "a blue square", "output": {"url": "validation/step-000030-1.png"}}]
    assert report.card_widget(["a", "b"], [None, "validation/b.png"]) == [{"text": "b", "output": {"url": "validation/b.png"}}]
    data = ModelCardData(library_name="diffusers", widget=widget)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# card\n")
    assert card.data.to_dict()["widget"] == widget  # survives the YAML round trip


def test_write_card_images_on_a_real_run(trained, tmp_path):
    """The real run's validation images (two prompts, steps 15 and 30) and training_info.json."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    shutil.copytree(trained / "validation", out / "validation")
    info = json.loads((trained / "training_info.json").read_text())
    assert len(info["loss_history"]) == 30
    markdown, widget, notes = report.write_card_images(str(out), info, ["a red circle", "a blue square"])
    assert notes == [] and "](validation_grid.png)" in markdown and "](loss_curve.png)" in markdown
    assert widget == [{"text": "a red circle", "output": {"url": "validation/step-000030-0.png"}},
                      {"text": "a blue square", "output": {"url": "validation/step-000030-1.png"}}]
    with Image.open(out / "validation" / "step-000030-0.png") as first, Image.open(out / report.VALIDATION_GRID_NAME) as grid:
        w, h = first.size
        assert grid.size == (2 * w + 3 * report.GRID_GAP, h + report.GRID_CAPTION_HEIGHT + 2 * report.GRID_GAP)


def test_write_card_images_without_matplotlib_notes_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    markdown, widget, notes = report.write_card_images(str(tmp_path), {"loss_history": [[1, 0.5]]}, ["a"])
    assert notes == [report.MATPLOTLIB_NOTE] and markdown == "" and widget == []
    assert os.listdir(tmp_path) == []
