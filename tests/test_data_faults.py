"""Data and flags that look valid but are not: numeric or mostly missing captions, parquet written
by plain pyarrow/pandas, an output folder inside the dataset, batches larger than the dataset, a
rank wider than the layers, a warm-up longer than the run, negative numbers on the command line."""

import argparse
import io
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_script, train_args
from PIL import Image
from safetensors.torch import load_file

from tools.make_tiny_models import make_image_dataset
from wuerstchen_lora import flags
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.data import describe_effective_batch, load_training_dataset
from wuerstchen_lora.models import UserError


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def refused(argv, capsys):
    """main() with a prior that does not exist: anything refused reaches no model."""
    assert trainer.main([str(a) for a in argv]) == 2
    return error_line(capsys.readouterr().err)


def no_models(dataset, out, *extra):
    return ["--dataset", dataset, "--output_dir", out, "--pretrained_prior_model_name_or_path", f"{out}-no-such-prior", "--report_to", "none", *extra]


def nothing_written(out):
    assert not os.path.exists(out) or not any(os.scandir(out)), os.listdir(out)


def png_bytes(color, size=(96, 80)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


COLORS = ["red", "green", "blue", "yellow"]


# ---------------------------------------------------------------------------------------------
# 1. Captions that are numbers, or mostly missing, in every format

def numeric_caption_dataset(tmp_path, kind):
    if kind == "jsonl":
        path = make_image_dataset(tmp_path / "d", "jsonl", n=4)
        rows = [json.loads(line) for line in open(path)]
        with open(path, "w") as f:
            f.writelines(json.dumps({**row, "caption": 10 + i}) + "\n" for i, row in enumerate(rows))
        return path
    if kind == "csv":  # a gap turns pandas' integer column into floats: 10.0 must read "10"
        path = make_image_dataset(tmp_path / "d", "csv", n=4)
        frame = pd.read_csv(path)
        frame["caption"] = [10, None, 12, 13]
        frame.to_csv(path, index=False)
        return path
    if kind == "imagefolder_csv":
        folder = make_image_dataset(tmp_path / "d", "imagefolder_csv", n=4)
        frame = pd.read_csv(os.path.join(folder, "metadata.csv"))
        frame["text"] = [10, 11, 12, 13]
        frame.to_csv(os.path.join(folder, "metadata.csv"), index=False)
        return folder
    path = tmp_path / "d.parquet"  # list captions of floats, written by pandas
    pd.DataFrame({"image": [png_bytes(c) for c in COLORS], "tags": [[10.0, 1.5], [11.0], [12.0], [13.0]]}).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "imagefolder_csv", "parquet_list"])
def test_numeric_captions_become_text(tmp_path, kind):
    stats = {}
    dataset, _, column = load_training_dataset(numeric_caption_dataset(tmp_path, kind), stats=stats)
    values = dataset[column]
    if kind == "parquet_list":
        assert values[0] == ["10", "1.5"] and stats["numeric_captions"] == 4
    elif kind == "csv":
        assert values == ["10", None, "12", "13"] and stats["numeric_captions"] == 3
    else:
        assert values == ["10", "11", "12", "13"] and stats["numeric_captions"] == 4


def missing_caption_dataset(tmp_path, kind):
    """4 images, 3 of them without a caption, written the way each format writes nothing."""
    if kind == "jsonl_null":
        path = make_image_dataset(tmp_path / "d", "jsonl", n=4)
        rows = [json.loads(line) for line in open(path)]
        with open(path, "w") as f:
            f.writelines(json.dumps({**row, "caption": row["caption"] if i == 0 else None}) + "\n" for i, row in enumerate(rows))
        return path
    if kind == "jsonl_absent_key":
        path = make_image_dataset(tmp_path / "d", "jsonl", n=4)
        rows = [json.loads(line) for line in open(path)]
        with open(path, "w") as f:
            f.writelines(json.dumps(row if i == 0 else {"image": row["image"]}) + "\n" for i, row in enumerate(rows))
        return path
    if kind == "csv_blank":
        path = make_image_dataset(tmp_path / "d", "csv", n=4)
        lines = open(path).read().splitlines()
        open(path, "w").write("\n".join(lines[:2] + [line.split(",")[0] + "," for line in lines[2:]]) + "\n")
        return path
    if kind == "csv_all_blank":  # read as an all-NaN float column
        path = make_image_dataset(tmp_path / "d", "csv", n=4)
        lines = open(path).read().splitlines()
        open(path, "w").write("\n".join(lines[:1] + [line.split(",")[0] + "," for line in lines[1:]]) + "\n")
        return path
    if kind == "imagefolder_null":
        folder = make_image_dataset(tmp_path / "d", "imagefolder_jsonl", n=4)
        rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps({**row, "text": row["text"] if i == 0 else None}) + "\n" for i, row in enumerate(rows))
        return folder
    if kind == "txt_empty":
        folder = make_image_dataset(tmp_path / "d", "txt_captions", n=4)
        for txt in sorted(os.listdir(folder)):
            if txt.endswith(".txt") and not txt.startswith("img_000"):
                open(os.path.join(folder, txt), "w").write("  \n")
        return folder
    path = tmp_path / "d.parquet"  # parquet_null, by pyarrow
    pq.write_table(pa.table({"image": [{"bytes": png_bytes(c), "path": None} for c in COLORS], "text": ["a cat", None, "", None]}), path)
    return str(path)


MISSING_KINDS = ["jsonl_null", "jsonl_absent_key", "csv_blank", "csv_all_blank", "imagefolder_null", "txt_empty", "parquet_null"]


@pytest.mark.parametrize("kind", MISSING_KINDS)
def test_mostly_missing_captions_are_refused(tmp_path, kind, capsys):
    out = tmp_path / "out"
    line = refused(no_models(missing_caption_dataset(tmp_path, kind), out), capsys)
    n = 4 if kind == "csv_all_blank" else 3
    assert f"{n} of 4 captions" in line and "--allow_missing_captions" in line, line
    nothing_written(out)


def test_allow_missing_captions_and_a_minority_warns(tmp_path, capsys):
    dataset = missing_caption_dataset(tmp_path, "jsonl_null")
    line = refused(no_models(dataset, tmp_path / "out", "--allow_missing_captions"), capsys)
    assert "could not load the tokenizer" in line  # past the caption check, stopped by the missing prior
    path = make_image_dataset(tmp_path / "half", "jsonl", n=4)  # 2 of 4 missing: not more than half
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps({**row, "caption": None if i % 2 else row["caption"]}) + "\n" for i, row in enumerate(rows))
    assert trainer.main(no_models(path, str(tmp_path / "out2"))) == 2
    err = capsys.readouterr().err
    assert "warning: 2 of 4 captions (column 'caption') are missing or empty" in err and "could not load the tokenizer" in err


def test_caption_column_that_is_not_text(tmp_path, capsys):
    path = make_image_dataset(tmp_path / "d", "jsonl", n=3)
    line = refused(no_models(path, tmp_path / "out", "--caption_column", "image", "--image_column", "image"), capsys)
    assert "--caption_column 'image' holds images, not text" in line


# ---------------------------------------------------------------------------------------------
# 2. Parquet written by plain pyarrow or pandas: {bytes, path} records, or bare bytes

@pytest.mark.parametrize("writer", ["pyarrow_bare_names", "pandas_bytes_column", "pyarrow_paths_only"])
def test_parquet_without_datasets_features_loads(tmp_path, writer):
    path = tmp_path / "sub" / "data.parquet"
    path.parent.mkdir()
    captions = [f"a {c} square" for c in COLORS]
    if writer == "pyarrow_bare_names":
        images = [{"bytes": png_bytes(c), "path": f"{c}.png" if i % 2 else None} for i, c in enumerate(COLORS)]
        pq.write_table(pa.table({"image": images, "text": captions}), path)
    elif writer == "pandas_bytes_column":
        pd.DataFrame({"picture": [png_bytes(c) for c in COLORS], "text": captions}).to_parquet(path)
    else:  # records without bytes: bare names are relative to the parquet file, not to the working directory
        for c in COLORS:
            (path.parent / f"{c}.png").write_bytes(png_bytes(c))
        pq.write_table(pa.table({"image": [{"bytes": None, "path": f"{c}.png"} for c in COLORS], "text": captions}), path)
    dataset, image_column, _ = load_training_dataset(str(path))  # a column of bytes is found by its type, whatever its name
    assert [dataset[i][image_column].getpixel((0, 0)) for i in range(4)] == [Image.new("RGB", (1, 1), c).getpixel((0, 0)) for c in COLORS]


def test_pyarrow_parquet_with_numeric_captions_trains(tiny, tmp_path):
    """The crash of the report (a path join on {bytes, path} records), with numeric captions that
    the cache used to store as the empty caption; 3 samples under an accumulation window of 4."""
    path = tmp_path / "data.parquet"
    images = [{"bytes": png_bytes(c), "path": None if i % 2 else f"{c}.png"} for i, c in enumerate(COLORS[:3])]
    pq.write_table(pa.table({"image": images, "caption": [1, 22, 333]}), path)
    out = tmp_path / "out"
    proc = run_script(train_args(tiny, out, dataset=str(path), steps=2, extra=["--train_batch_size", "1", "--gradient_accumulation_steps", "4"]),
                      launcher="inprocess")
    assert ("3 samples, 2 steps, effective batch 3, capped by the dataset: 3 samples per epoch, fewer than 1 x 1 processes x 4 accumulation = 4; "
            "each update takes one whole epoch") in proc.stdout, proc.stdout
    info = json.loads((out / "training_info.json").read_text())
    assert info["global_step"] == 2  # one update per epoch, two epochs
    assert info["data"]["numeric_captions"] == 3 and info["data"]["empty_captions"] == 0
    assert "3 numeric captions (converted to text)" in proc.stdout
    cache = next((out / "embeddings_cache").iterdir())
    empty = load_file(cache / "empty.safetensors")["empty"]
    texts = load_file(cache / "texts-000.safetensors")
    assert len(texts) == 3 and not any(t.allclose(empty) for t in texts.values())  # conditioned on "1", "22", "333"


# ---------------------------------------------------------------------------------------------
# 3. An output folder inside the dataset folder

@pytest.mark.parametrize("where", ["inside", "equal", "cache_inside", "via_symlink"])
def test_output_inside_the_dataset_is_refused(tmp_path, where, capsys):
    folder = make_image_dataset(tmp_path / "data", "txt_captions", n=2)
    before = sorted(os.listdir(folder))
    extra, flag = [], "--output_dir"
    out = os.path.join(folder, "out")
    if where == "equal":
        out = folder
    elif where == "cache_inside":
        out, flag = str(tmp_path / "out"), "--embeddings_cache_dir"
        extra = ["--embeddings_cache_dir", os.path.join(folder, "cache")]
    elif where == "via_symlink":
        os.symlink(folder, tmp_path / "link")
        out = str(tmp_path / "link" / "out")
    line = refused(no_models(folder, out, *extra), capsys)
    assert f"{flag} " in line and f"is inside --dataset {folder}" in line and "put it outside the dataset folder" in line, line
    assert sorted(os.listdir(folder)) == before
    nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# 4. The effective batch, when the dataset is smaller than one batch (a window spanning more than an epoch: above)

def test_dataset_smaller_than_one_batch(tiny, tmp_path):
    folder = make_image_dataset(tmp_path / "data", "txt_captions", n=1)
    out = tmp_path / "out"
    argv = [a for a in train_args(tiny, out, dataset=folder)]
    i = argv.index("--max_train_steps")
    del argv[i:i + 2]  # an epoch-based run: 3 epochs of one sample
    proc = run_script(argv + ["--num_train_epochs", "3", "--lr_scheduler", "linear", "--lr_warmup_steps", "5"], launcher="inprocess")
    assert ("1 samples, 3 steps, effective batch 1, capped by the dataset: 1 sample per epoch, fewer than 2 x 1 processes x 1 accumulation = 2; "
            "each update takes one whole epoch") in proc.stdout, proc.stdout
    assert "warning: --lr_warmup_steps 5 is not shorter than the run (3 steps)" in proc.stderr
    assert json.loads((out / "training_info.json").read_text())["global_step"] == 3


def test_effective_batch_line():
    assert describe_effective_batch(8, 2, 1, 4, 4) == "effective batch 8 (2 x 1 processes x 4 accumulation)"
    assert describe_effective_batch(10, 2, 1, 3, 5).endswith("the last update of each epoch takes the remaining 4 samples (accumulation windows end with the epoch)")
    assert describe_effective_batch(7, 2, 1, 4, 4).startswith("effective batch 7, capped by the dataset")
    assert describe_effective_batch(1, 2, 2, 1, 1, padded=True).startswith("effective batch 1 (topped up to 4 with repeats), capped by the dataset")


# ---------------------------------------------------------------------------------------------
# 5. Flags accepted silently before: rank wider than the layers, warm-up longer than the run, negative numbers

def test_rank_larger_than_the_layers(tiny, tmp_path, capsys):
    base = ["--dataset", "data", "--pretrained_prior_model_name_or_path", tiny["prior"], "--output_dir", str(tmp_path / "out")]
    line = refused(base + ["--rank", "64"], capsys)  # the tiny prior's attention is c = 32 wide
    assert "--rank 64 is larger than every adapted layer is wide (at most 32 features" in line and "use --rank 32 or less" in line
    nothing_written(tmp_path / "out")
    flags.parse_args(base + ["--rank", "16", "--lora_targets", "all-linear"])  # only the timestep mapper (c_r = 8) is narrower
    err = capsys.readouterr().err
    assert err.startswith("warning: --rank 16 is larger than mapper (8 wide)") and len(err.splitlines()) == 1, err
    flags.parse_args(base + ["--rank", "32"])
    assert capsys.readouterr().err == ""


def test_warmup_longer_than_the_run_or_ignored(capsys):
    flags.parse_args(["--dataset", "data", "--max_train_steps", "10", "--lr_warmup_steps", "10", "--lr_scheduler", "cosine"])
    assert "warning: --lr_warmup_steps 10 is not shorter than the run (10 steps)" in capsys.readouterr().err
    flags.parse_args(["--dataset", "data", "--max_train_steps", "100", "--lr_warmup_steps", "10"])
    assert "warning: --lr_warmup_steps 10 does nothing with --lr_scheduler constant" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "-1e-4"], "error: --learning_rate must be positive (got -0.0001)"),
    (["--learning_rate", "-1."], "error: --learning_rate must be positive (got -1)"),
    (["--learning_rate", "nan"], "error: --learning_rate must be a finite number (got nan)"),
    (["--max_grad_norm", "-inf"], "error: --max_grad_norm must be a finite number (got -inf)"),
    (["--adam_epsilon", "-1E-8"], "error: --adam_epsilon must be positive"),
    (["--adam_weight_decay", "-.5e-2"], "error: --adam_weight_decay must be 0 or more"),
    (["--adam_beta2", "1.5"], "error: --adam_beta2 must be in [0, 1)"),
])
def test_negative_and_non_finite_numbers(argv, message, capsys):
    assert trainer.main(["--dataset", "data", "--output_dir", "/tmp/never-written-faults"] + argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == err.strip().splitlines()[0] and err.startswith(message) and "expected one argument" not in err, err
    assert not os.path.exists("/tmp/never-written-faults")


def test_every_numeric_flag_takes_a_negative_number(monkeypatch):
    """No numeric flag fails with argparse's "expected one argument": each parses -1e-3 (float) or
    -1 (int), and either accepts it or names itself in the error."""
    parser_actions = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        parser_actions.extend(a for a in self._actions if (a.type in (int, float) or getattr(a.type, "numeric", False)) and a.nargs is None)
        return original(self, args, namespace)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", spy)
        flags.parse_args(["--dataset", "data"])
    assert len(parser_actions) > 20
    for action in parser_actions:
        flag, value = action.option_strings[0], "-1e-3" if action.type.__name__ == "float" else "-1"
        try:
            args = flags.parse_args(["--dataset", "data", flag, value])
        except UserError as e:
            assert str(e).startswith(flag + " ") or flag in str(e), (flag, str(e))
        else:
            if action.dest != "local_rank":  # read and dropped: the environment says where a process runs
                assert args.flat()[action.dest] == action.type(value), flag
