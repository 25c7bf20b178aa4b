"""Data layouts and habits of kohya's sd-scripts, OneTrainer and SimpleTuner (issue 19): N_name repeat
folders, caption files and their extension, missing captions, captions from names, kohya's
meta_cap.json, `--resume_from_checkpoint latest` on a first launch, the help pages and the log lines."""

import json
import os
import shutil

import pytest
from conftest import run_script, train_args

from tools.make_tiny_models import make_image_dataset
from wuerstchen_lora import flags
from wuerstchen_lora import inference as infer
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.cache import MANIFEST, CachedExamples
from wuerstchen_lora.data import (
    FOLDER_COLUMN,
    BucketBatchSampler,
    CaptionedImages,
    EpochRows,
    ImageTransform,
    check_captions,
    folder_shares,
    load_training_dataset,
    row_repeats,
)
from wuerstchen_lora.models import UserError


def kohya_folder(root, with_plain=True):
    """train/10_a (2 images, .txt), train/2_b (3 images, .caption), and train/plain (1 image, .txt)."""
    make_image_dataset(root / "10_a", "txt_captions", n=2, size=(64, 64))
    make_image_dataset(root / "2_b", "txt_captions", n=3, size=(64, 64), seed=1)
    for txt in (root / "2_b").glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    if with_plain:
        make_image_dataset(root / "plain", "txt_captions", n=1, size=(64, 64), seed=2)
    return str(root)


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# kohya's N_name repeat folders


def test_repeat_folders_weight_each_folder_in_every_sampler(tmp_path):
    root = kohya_folder(tmp_path / "train")
    stats = {}
    dataset, image_column, caption_column = load_training_dataset(root, stats=stats, folder_repeats=True)
    assert stats["folder_repeats"] == {"10_a": 10, "2_b": 2, "plain": 1}
    per_row = row_repeats(dataset, stats)
    assert sorted(per_row) == [1, 2, 2, 2, 10, 10]
    line = folder_shares(dataset, stats, repeats=2)
    assert line.startswith("data: kohya repeat folders, 54 samples per epoch")
    assert "10_a 2 images x 10 x --repeats 2 = 40 (74%)" in line and "2_b 3 images x 2 x --repeats 2 = 12 (22%)" in line and "plain 1 image x 1 x --repeats 2 = 2 (4%)" in line

    # The same sample -> row map in the uncached dataset, the cached one and the bucket sampler.
    index = EpochRows(len(dataset), 2, per_row)
    rows = [index.row(k) for k in range(len(index))]
    assert len(rows) == 54 and all(rows.count(i) == 2 * r for i, r in enumerate(per_row))
    uncached = CaptionedImages(dataset, image_column, caption_column, ImageTransform(64), seed=0, repeats=2, per_row=per_row)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({"rows": len(dataset), "shards": 1}))
    cached = CachedExamples(str(cache), 64, False, 0, repeats=2, per_row=per_row)
    assert len(uncached) == len(cached) == 54
    assert [uncached.index.row(k) for k in range(54)] == [cached.index.row(k) for k in range(54)] == rows
    assert uncached[0]["caption"] == uncached[1]["caption"] and not (uncached[0]["noise"] == uncached[1]["noise"]).all()  # a copy, drawn anew
    sampler = BucketBatchSampler([(64, 64)] * 5 + [(32, 128)], batch_size=4, seed=0, repeats=2, per_row=per_row)
    drawn = sorted(k for batch in sampler for k in batch)
    assert set(drawn) == set(range(54)) and len(sampler) == len(list(sampler))
    # Every row once: the plain index (the golden losses and every earlier run draw what they drew).
    assert [EpochRows(3, 2, [1, 1, 1]).row(k) for k in range(6)] == [0, 1, 2, 0, 1, 2]

    plain, _, _ = load_training_dataset(root, stats={})  # --no_folder_repeats: the names are only names
    assert FOLDER_COLUMN not in plain.column_names and len(plain) == 6
    (tmp_path / "train" / "10_a").rename(tmp_path / "train" / "0_a")
    with pytest.raises(UserError, match="asks for 0 repeats.*--no_folder_repeats"):
        load_training_dataset(root, folder_repeats=True)


def test_repeat_folders_train_cached_and_uncached_and_resume_exactly(tiny, tmp_path):
    """A kohya folder trains with its folders' repeats in both paths (the epoch is 2 x 10 + 3 x 2 +
    1 = 27 samples), prints each folder's share, and a resume mid-epoch gives the straight run's
    LoRA. `latest` on the first launch starts fresh with a note."""
    root = kohya_folder(tmp_path / "train")
    base = ["--checkpointing_steps", "2", "--center_crop"]
    straight = run_script(train_args(tiny, tmp_path / "straight", root, steps=4, extra=base + ["--resume_from_checkpoint", "latest"]), launcher="inprocess")
    assert "note: --resume_from_checkpoint latest: no checkpoint in" in straight.stdout
    assert "27 samples, 4 steps" in straight.stdout
    assert "data: kohya repeat folders, 27 samples per epoch: 10_a 2 images x 10 = 20 (74%); 2_b 3 images x 2 = 6 (22%); plain 1 image x 1 = 1 (4%)" in straight.stdout
    assert "captions: same-stem caption files (3 .caption, 3 .txt)" in straight.stdout
    assert "step 2: saved checkpoint" in straight.stdout and "fp32 on cpu" in straight.stdout and "data summary" not in straight.stdout
    written = next(line for line in straight.stdout.splitlines() if line.startswith("wrote to "))
    assert "the LoRA pytorch_lora_weights.safetensors" in written and "the model card README.md" in written
    args = json.loads((tmp_path / "straight" / "args.json").read_text())
    assert args["data_used"] == {"caption_source": "caption files", "image_column_used": "image", "caption_column_used": "text"}

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(tmp_path / "straight" / "args.json", resumed / "args.json")
    again = run_script(train_args(tiny, resumed, root, steps=4, extra=base + ["--resume_from_checkpoint", "latest"]), launcher="inprocess")
    assert "resumed from" in again.stdout
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors"), load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    uncached = run_script(train_args(tiny, tmp_path / "uncached", root, steps=1, extra=base + ["--no_cache_embeddings", "--no_folder_repeats"]),
                          launcher="inprocess")
    assert "6 samples, 1 steps" in uncached.stdout and "kohya repeat folders" not in uncached.stdout
    with_repeats = run_script(train_args(tiny, tmp_path / "uncached2", root, steps=1, extra=base + ["--no_cache_embeddings", "--repeats", "2"]),
                              launcher="inprocess")
    assert "54 samples, 1 steps" in with_repeats.stdout


# ---------------------------------------------------------------------------------------------
# Caption files: extension, missing ones, names, kohya's metadata


def test_caption_extension_and_caption_files(tmp_path):
    root = tmp_path / "d"
    make_image_dataset(root, "txt_captions", n=3, size=(64, 64))
    for i, txt in enumerate(sorted(root.glob("*.txt"))):
        txt.rename(txt.with_suffix(".tags"))
    with pytest.raises(UserError, match=r"no captions .*found \.tags files beside them: pass --caption_extension \.tags"):
        load_training_dataset(str(root))
    for flag in (".tags", "tags"):
        stats = {}
        dataset, _, column = load_training_dataset(str(root), stats=stats, caption_extension=flag)
        assert all(dataset[column]) and stats["caption_files"] == {".tags": 3}
    (root / "img_000.txt").write_text("the txt wins only without the flag")
    dataset, _, column = load_training_dataset(str(root), caption_extension=".tags")
    assert "the txt wins only without the flag" not in dataset[column]
    assert flags.parse_args(["--dataset", str(root), "--caption_extension", "tags"]).data.caption_extension == ".tags"
    with pytest.raises(UserError, match="not a file extension"):
        flags.parse_args(["--dataset", str(root), "--caption_extension", "."])


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_missing_and_empty_caption_files_behave_alike(tmp_path, how):
    root = tmp_path / "d"
    make_image_dataset(root, "txt_captions", n=4, size=(64, 64))
    captions = sorted(root.glob("*.txt"))

    def drop(txt):
        txt.unlink() if how == "missing" else txt.write_text("")

    drop(captions[0])
    stats = {}
    dataset, _, column = load_training_dataset(str(root), stats=stats)
    assert len(dataset) == 4
    warning = check_captions(dataset, column, str(root), missing_file=stats["missing_caption_example"], caption_files=True)
    assert warning.startswith("warning: 1 of 4 captions are missing or empty (images without a caption file or with an empty one")
    assert ("img_000.png has none" in warning) == (how == "missing") and "empty (unconditional) caption" in warning
    for txt in captions[1:]:
        drop(txt)
    allow = how == "missing"  # all four gone: refused unless --allow_missing_captions, as for four empty files
    with pytest.raises(UserError, match="--allow_missing_captions"):
        dataset, _, column = load_training_dataset(str(root))
        check_captions(dataset, column, str(root))
    dataset, _, column = load_training_dataset(str(root), allow_missing_captions=allow)
    assert check_captions(dataset, column, str(root), allow_missing=True).startswith("warning: 4 of 4")


def test_captions_from_names_and_kohya_metadata(tmp_path, capsys):
    root = tmp_path / "train"
    make_image_dataset(root / "5_sks dog", "txt_captions", n=2, size=(64, 64))
    for txt in root.glob("*/*.txt"):
        txt.unlink()
    with pytest.raises(UserError, match="--caption_from folder\\|filename"):
        load_training_dataset(str(root))
    dataset, _, column = load_training_dataset(str(root), caption_from="folder", folder_repeats=True)
    assert dataset[column] == ["sks dog", "sks dog"] and FOLDER_COLUMN in dataset.column_names
    dataset, _, column = load_training_dataset(str(root), caption_from="filename")
    assert dataset[column] == ["img 000", "img 001"]

    meta = root / "meta_cap.json"
    meta.write_text(json.dumps({"img_000": {"caption": "a dog", "tags": "dog"}, "img_001": {"caption": "a dog"}}))
    with pytest.raises(UserError, match="meta_cap.json, kohya's fine-tuning metadata"):
        load_training_dataset(str(root))
    with pytest.raises(UserError, match="kohya's fine-tuning metadata"):
        load_training_dataset(str(meta))

    both = tmp_path / "both"
    make_image_dataset(both, "imagefolder_jsonl", n=2, size=(64, 64))
    for name in ("img_000", "img_001"):
        (both / f"{name}.txt").write_text("never read")
    out = tmp_path / "out"
    assert trainer.main(["--dataset", str(both), "--output_dir", str(out), "--pretrained_prior_model_name_or_path", str(out) + "-no-prior",
                         "--report_to", "none"]) == 2
    captured = capsys.readouterr()
    assert "holds metadata.jsonl and 2 same-stem caption files: the captions come from metadata.jsonl (column 'text')" in captured.err
    assert "captions: metadata.jsonl, column 'text'" in captured.out


# ---------------------------------------------------------------------------------------------
# Habits: resume 'latest' on the first launch, the help pages


def test_latest_without_a_checkpoint_starts_fresh_but_never_over_a_run(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = flags.parse_args(["--dataset", tiny["dataset"], "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert cfg.output.resume_from_checkpoint == "latest"
    assert "note: --resume_from_checkpoint latest: no checkpoint in" in capsys.readouterr().out
    run_script(train_args(tiny, out, steps=1, extra=["--checkpointing_steps", "0"]), launcher="inprocess")  # a finished run, no checkpoint
    line = error_line(run_script(train_args(tiny, out, extra=["--resume_from_checkpoint", "latest"]), launcher="inprocess", check=False).stderr)
    assert "holds an earlier run" in line and "--overwrite_output_dir" in line  # the guard of issue 24 still holds
    (out / "checkpoint-3").mkdir()
    with pytest.raises(UserError, match="checkpoint-3: incomplete, or another tool's"):
        flags.parse_args(["--dataset", tiny["dataset"], "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def options_without_help(page):
    """Options of a --help page with no text after them (on their line or the next)."""
    lines = page.splitlines()
    bare = []
    for i, line in enumerate(lines):
        if line.startswith("  -") and len(line.split("  ")) < 3 and line.strip().count(" ") <= 2:
            follow = lines[i + 1] if i + 1 < len(lines) else ""
            if not follow.startswith(" " * 10) or follow.strip().startswith("-"):
                bare.append(line.strip())
    return bare


@pytest.mark.parametrize("which", ["train", "infer"])
def test_help_gives_every_option_a_line_and_its_default(which, capsys):
    parse = flags.parse_args if which == "train" else infer.parse_args
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    page = capsys.readouterr().out
    usage = page.split("\n\n")[0]
    assert usage.startswith("usage: ") and len(usage.splitlines()) == 1, usage  # the options are listed below, not in the usage
    assert options_without_help(page) == []
    if which == "train":
        parser = flags.make_parser()
        assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
        for shown in ("LoRA rank (default: 8)", "(default: 768)", "(default: 0.0001)", "(default: 42)", "(default: .txt)",
                      "--output_dir PATH", "(default: wuerstchen-prior-lora)", "--no_folder_repeats", "--learning_rate X"):
            assert shown in page, shown
        assert len(page.splitlines()) < 300
    else:
        for shown in ("--decoder_steps N", "(default: 12)", "(default: 4.0)", "--negative_prompt TEXT"):
            assert shown in page, shown


def test_logs_tell_validation_checkpoint_and_what_was_written(tiny, tmp_path):
    """One line per validation and checkpoint, the files at the end, and the diffusers example's
    `train_loss` tag beside `train/loss`; kohya folders with buckets keep their repeats."""
    root = kohya_folder(tmp_path / "train", with_plain=False)
    out = tmp_path / "out"
    proc = run_script(train_args(tiny, out, root, steps=2, extra=["--validation_prompts", "a red circle", "--validation_steps", "2",
                                                                  "--checkpointing_steps", "1", "--report_to", "tensorboard", "--aspect_ratio_buckets"]),
                      launcher="inprocess")
    assert "26 samples, 2 steps" in proc.stdout
    assert "step 1: saved checkpoint" in proc.stdout and "step 2: saved checkpoint" in proc.stdout
    assert f"step 2: 1 validation image in {out / 'validation'}" in proc.stdout
    written = next(line for line in proc.stdout.splitlines() if line.startswith("wrote to "))
    assert "the validation grid validation_grid.png" in written and "logs/ (the tensorboard logs)" in written and "validation/" in written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(d, f) for d, _, files in os.walk(out / "logs") for f in files if "tfevents" in f]
    tags = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train_loss"} <= tags, tags
