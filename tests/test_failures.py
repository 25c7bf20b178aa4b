"""Bad input, broken data, interruptions, non-finite losses: clear one-line errors, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_clean_error, run_script, script_env, train_args
from PIL import Image
from safetensors.torch import load_file

from tools.make_tiny_models import make_image_dataset
from wuerstchen_lora import inference as infer
from wuerstchen_lora import models as wuerstchen_models
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME


# ---------------------------------------------------------------------------------------------
# Arguments: refused by the parser's checks, before anything is loaded

BASE = ["--dataset", "data"]


@pytest.mark.parametrize("argv, needle", [
    (["--resolution", "100"], "use 96"),
    (["--rank", "0"], "--rank must be positive"),
    (["--max_train_steps", "0"], "--max_train_steps must be positive"),
    (["--train_batch_size", "-1"], "--train_batch_size must be positive"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--max_bad_images", "1.5"], "--max_bad_images"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "no such folder"),
    ([], "--dataset is required"),
])
def test_bad_arguments(argv, needle, capsys):
    args = argv if "--dataset" in " ".join(argv) or needle.startswith("--dataset") else BASE + argv
    if needle == "--dataset is required":
        args = argv
    assert trainer.main(args + ["--output_dir", "/tmp/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists("/tmp/never-written")


def test_output_dir_that_is_a_file_and_latest_without_checkpoint(tmp_path, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("precious")
    assert trainer.main(BASE + ["--output_dir", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "precious"
    # 'latest' with no checkpoint yet starts a new run (issue 19), which then fails on BASE's missing dataset
    assert trainer.main(BASE + ["--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", "latest"]) == 2
    captured = capsys.readouterr()
    assert "note: --resume_from_checkpoint latest: no checkpoint in" in captured.out and "--dataset data" in captured.err


def test_parser_errors_are_one_line(capsys):
    """Conflicting flags, values out of range, unknown flags: the parser's own errors are one
    `error:` line too (argparse would print its usage and exit), and nothing is written."""
    cases = [(["--center_crop", "--random_crop"], "not allowed with argument"),
             (["--caption_dropout", "1.5"], "--caption_dropout must be in [0, 1) (got 1.5)"),
             (["--rank", "two"], "--rank must be a whole number (got two)"),
             (["--ema_decay", "1"], "--ema_decay must be in (0, 1) (got 1)"),
             (["--no_such_flag"], "unrecognized arguments: --no_such_flag")]
    for argv, needle in cases:
        assert trainer.main(BASE + argv + ["--output_dir", "/tmp/never-written"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists("/tmp/never-written")


# ---------------------------------------------------------------------------------------------
# Data problems found before any model loads (the prior path does not even exist)

def no_models_args(dataset, out, *extra):
    return ["--dataset", str(dataset), "--output_dir", str(out), "--pretrained_prior_model_name_or_path",
            str(out) + "-no-such-prior", "--report_to", "none", *extra]


@pytest.mark.parametrize("case", ["missing", "empty_folder", "no_captions", "wrong_column", "most_captions_missing", "empty_file"])
def test_data_errors_before_models_load(tmp_path, case, capsys):
    folder = tmp_path / "data"
    extra = []
    if case == "missing":
        dataset, needles = tmp_path / "nothing-here", ["no such file or folder"]
    elif case == "empty_folder":
        folder.mkdir()
        dataset, needles = folder, ["no images found"]
    elif case == "no_captions":
        make_image_dataset(folder, "txt_captions", n=3)
        for txt in folder.glob("*.txt"):
            txt.unlink()
        dataset, needles = folder, ["no captions"]
    elif case == "wrong_column":
        dataset = make_image_dataset(folder, "jsonl", n=3)
        extra, needles = ["--caption_column", "prompt"], ["'prompt' is not a column", "image, caption"]
    elif case == "most_captions_missing":  # missing caption files count as empty ones (issue 19): a warning at half or fewer
        make_image_dataset(folder, "txt_captions", n=4)
        for txt in sorted(folder.glob("*.txt"))[:3]:
            txt.unlink()
        dataset, needles = folder, ["3 of 4 captions are missing or empty", "without a caption file", "img_000", "--allow_missing_captions"]
    else:
        dataset = tmp_path / "data.jsonl"
        dataset.write_text("")
        needles = ["the file is empty"]
    assert trainer.main(no_models_args(dataset, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


# ---------------------------------------------------------------------------------------------
# Broken data in the middle of a dataset

def broken_dataset(folder, n_good):
    make_image_dataset(folder, "txt_captions", n=n_good)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG")
    data = (folder / "img_000.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (16, 16), "red").save(folder / "tiny.png")
    for name in ("zero", "text", "truncated", "tiny"):
        (folder / f"{name}.txt").write_text("broken one")
    (folder / "img_001.txt").write_text("")                             # empty caption
    (folder / "img_002.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    (folder / "img_003.txt").write_text(" ".join(["word"] * 200))       # far past 77 tokens
    return folder


def test_too_many_broken_images_stop_before_training(tiny, tmp_path):
    data = broken_dataset(tmp_path / "data", n_good=8)  # 4 of 12 broken
    proc = run_script(train_args(tiny, tmp_path / "out", dataset=data), check=False)
    assert_clean_error(proc, "4 of 12 images are unreadable", "--max_bad_images")


def test_broken_images_are_skipped_and_reported(tiny, tmp_path):
    data = broken_dataset(tmp_path / "data", n_good=8)
    proc = run_script(train_args(tiny, tmp_path / "out", dataset=data, extra=["--max_bad_images", "0.4"]), launcher="inprocess")
    out = proc.stdout + proc.stderr
    for reason in ("zero.jpg: empty file", "text.jpg: not an image", "truncated.png: truncated or corrupt", "tiny.png: too small"):
        assert reason in out, out[-3000:]
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("data summary"))
    assert "skipped 4 unreadable images" in summary
    assert "1 empty captions" in summary and "1 captions longer than 77 tokens" in summary and "1 caption files not in UTF-8" in summary
    info = json.loads((tmp_path / "out" / "training_info.json").read_text())
    assert info["data"]["images"] == 8 and info["data"]["bad_images"] == 4


def test_nothing_usable(tiny, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_text("not an image")
        (folder / f"{i}.txt").write_text("caption")
    proc = run_script(train_args(tiny, tmp_path / "out", dataset=folder), check=False, launcher="inprocess")
    assert_clean_error(proc, "none of the 3 images could be read")


# ---------------------------------------------------------------------------------------------
# Interruptions: SIGTERM saves and exits; SIGKILL at any moment loses at most the steps since the last checkpoint

STOP_ARGS = ["--max_train_steps", "12", "--learning_rate", "1e-3", "--random_flip", "--lr_scheduler", "cosine"]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_script(train_args(tiny, out, extra=STOP_ARGS + ["--checkpointing_steps", "0"]), launcher="inprocess")
    return load_file(out / LORA_WEIGHTS_NAME)


def start(tiny, out, *extra):
    cmd = [sys.executable] + train_args(tiny, out, extra=STOP_ARGS + list(extra))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(), cwd=str(ROOT))


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the moment to stop it: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.005)


def assert_same_weights(out, reference):
    got = load_file(out / LORA_WEIGHTS_NAME)
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=0, atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same(tiny, tmp_path, uninterrupted):
    out = tmp_path / "out"
    proc = start(tiny, out, "--checkpointing_steps", "0")
    wait_for(lambda: (out / "args.json").exists(), proc)  # written just before the first step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted: saved" in err and "Traceback" not in err
    saved = trainer.list_checkpoints(str(out))
    assert len(saved) == 1 and 1 <= saved[0][0] < 12
    assert not (out / LORA_WEIGHTS_NAME).exists()  # no final file from a run that did not finish
    run_script(train_args(tiny, out, extra=STOP_ARGS + ["--checkpointing_steps", "0", "--resume_from_checkpoint", "latest"]), launcher="inprocess")
    assert_same_weights(out, uninterrupted)


@pytest.mark.parametrize("moment", ["during_a_checkpoint_save", "after_checkpoint_4"])
def test_sigkill_then_resume_latest_finishes_the_same(tiny, tmp_path, uninterrupted, moment):
    out = tmp_path / "out"
    proc = start(tiny, out, "--checkpointing_steps", "2")
    if moment == "during_a_checkpoint_save":
        # killed while a later checkpoint is being written: the earlier complete one must be used
        wait_for(lambda: (out / "checkpoint-2").exists() and any(p.name.startswith(".tmp-checkpoint") for p in out.iterdir()), proc)
    else:
        wait_for(lambda: (out / "checkpoint-4").exists(), proc)
    proc.kill()
    proc.communicate()
    assert trainer.list_checkpoints(str(out)), "no complete checkpoint to resume from"
    run_script(train_args(tiny, out, extra=STOP_ARGS + ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]), launcher="inprocess")
    assert_same_weights(out, uninterrupted)


def test_latest_skips_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    assert [s for s, _ in trainer.list_checkpoints(str(tmp_path))] == [2, 4]


# ---------------------------------------------------------------------------------------------
# Atomic writes: a failure while writing never damages the previous good file

def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "args.json"
    wuerstchen_models.atomic_write_json(str(target), {"good": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        wuerstchen_models.atomic_write_json(str(target), {"bad": 2})
    assert json.loads(target.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["args.json"]


def test_failed_lora_save_leaves_the_previous_lora(tmp_path, monkeypatch):
    good = {"blocks.2.attention.to_q.lora_A.weight": torch.ones(2, 4), "blocks.2.attention.to_q.lora_B.weight": torch.ones(4, 2)}
    path = wuerstchen_models.save_lora_file(str(tmp_path), good, None)
    before = open(path, "rb").read()
    from diffusers import WuerstchenPriorPipeline

    def crash(save_directory, **kwargs):
        with open(os.path.join(save_directory, LORA_WEIGHTS_NAME), "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WuerstchenPriorPipeline, "save_lora_weights", crash)
    with pytest.raises(OSError):
        wuerstchen_models.save_lora_file(str(tmp_path), good, None)
    assert open(path, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHTS_NAME]


# ---------------------------------------------------------------------------------------------
# Non-finite losses

def test_nonfinite_losses_stop_the_run_and_keep_the_good_files(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # The first, good run also checks that a hub token in the environment is written nowhere.
    token = "hf_THISISASECRETTOKEN1234567890"
    proc = subprocess.run([sys.executable] + train_args(tiny, out, extra=["--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "tensorboard"]),
                          capture_output=True, text=True, env={**script_env(), "HF_TOKEN": token}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert token not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    lora_before = (out / LORA_WEIGHTS_NAME).read_bytes()
    # The same run continued, every loss from here on NaN (a learning rate that large is refused up front,
    # and a new run in this folder would be refused as overwriting a finished run).
    real = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    proc = run_script(train_args(tiny, out, extra=["--max_train_steps", "20", "--max_nonfinite_steps", "3", "--checkpointing_steps", "2",
                                                  "--resume_from_checkpoint", "latest"]), launcher="inprocess", check=False)
    assert_clean_error(proc, "non-finite losses in a row", "bf16", "lower --learning_rate", status=1)
    assert (out / LORA_WEIGHTS_NAME).read_bytes() == lora_before
    for _, folder in trainer.list_checkpoints(str(out)):
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(folder, LORA_WEIGHTS_NAME)).values())


# ---------------------------------------------------------------------------------------------
# Security (the hub token check is in the non-finite test's first run)

def test_pickle_files_are_never_unpickled_with_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "effnet.pt"
    torch.save({"effnet_state_dict": Evil()}, bad)
    with pytest.raises(wuerstchen_models.UserError, match="cannot be read as weights"):
        wuerstchen_models.load_image_encoder(str(bad))
    assert not (tmp_path / "pwned").exists()


def test_infer_refuses_pickle_lora_and_damaged_files(tiny, tmp_path, capsys):
    pickle_lora = tmp_path / "lora.bin"
    torch.save({"prior.x.lora_A.weight": torch.zeros(1)}, pickle_lora)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x80\x04 not safetensors")
    for path, needle in ((pickle_lora, "only .safetensors"), (fake, "not a readable safetensors file")):
        assert infer.main(["--checkpoint", str(path), "--prompt", "x", "--prior_model", tiny["prior"], "--decoder_model", tiny["decoder"]]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# infer.py's own checks

def test_infer_input_errors(trained, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "no such file or folder"),
        (["--checkpoint", str(tmp_path)], "no pytorch_lora_weights.safetensors in this folder"),
        (["--checkpoint", str(trained), "--prompt_file", str(tmp_path / "prompts.txt")], "--prompt_file"),
    ]
    for argv, needle in cases:
        if "--prompt_file" not in argv:
            argv = argv + ["--prompt", "x"]
        assert infer.main(argv + ["--output", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_infer_rounds_sizes_to_128_and_says_so(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    assert infer.main(["--checkpoint", str(trained), "--prompt_file", str(prompts), "--height", "200", "--width", "100",
                       "--device", "cpu", "--output", str(tmp_path / "x.png")]) == 0
    captured = capsys.readouterr()
    assert "--height 200 is not a multiple of 128; using 256" in captured.err
    assert "--width 100 is not a multiple of 128; using 128" in captured.err
    paths = captured.out.split()
    assert len(paths) == 2 and all(Image.open(p).size == (128, 256) for p in paths)
