"""A new run never overwrites a finished one, the trainer deletes only what it wrote, and a run
that trained nothing (or on absurd settings) never ends with status 0 (issue 24).

Every refusal: one `error:` line naming the problem and the fix, no traceback, the right exit
status, and every file written before byte-identical. One finished run (a module fixture) serves
all the "folder holds a run" cases; most refusals come before any model loads."""

import hashlib
import json
import os
import shutil
import stat
import sys

import pytest
import torch
from conftest import INFER, assert_clean_error, run_script, train_args

from wuerstchen_lora import flags
from wuerstchen_lora import guard as run_guard
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME
from wuerstchen_lora.outputs import (
    EMA_STATE_NAME,
    LEGACY_EMA_STATE_NAME,
    TRAINER_ID,
    list_checkpoints,
    prune_checkpoints,
    replace_folder,
)

STEPS = 4
BASE = ["--checkpointing_steps", "2", "--learning_rate", "1e-3", "--use_ema"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One finished 4-step run (with EMA) holding checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_script(train_args(tiny, out, steps=STEPS, extra=BASE), launcher="inprocess")
    return out


def copy_run(finished, dest):
    shutil.copytree(finished, dest)
    return dest


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(tiny, out, *extra, steps=STEPS, base=BASE):
    return run_script(train_args(tiny, out, steps=steps, extra=list(base) + list(extra)), launcher="inprocess", check=False)


def foreign_checkpoint(folder, step):
    """A checkpoint-N of another tool (transformers' Trainer writes a trainer_state.json too)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [], "best_metric": None}))
    (path / "model.safetensors").write_bytes(b"their weights")
    return path


# ---------------------------------------------------------------------------------------------
# Lost work: a new run in a folder that holds a run

@pytest.mark.parametrize("keep", ["everything", "only checkpoint-4", "only args.json", "only the LoRA"])
def test_a_new_run_in_a_finished_runs_folder_is_refused(tiny, finished, tmp_path, no_models, keep):
    out = copy_run(finished, tmp_path / "out")
    kept = {"only checkpoint-4": {"checkpoint-4"}, "only args.json": {"args.json"}, "only the LoRA": {LORA_WEIGHTS_NAME, "training_info.json"}}.get(keep)
    if kept:
        for entry in out.iterdir():
            if entry.name not in kept | {"embeddings_cache"}:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    before = snapshot(out)
    line = assert_clean_error(run(tiny, out, "--checkpoints_total_limit", "1"), "holds an earlier run", "--resume_from_checkpoint",
                              "--overwrite_output_dir", "another --output_dir")
    assert ("continue it with --resume_from_checkpoint latest" in line) == (keep in ("everything", "only checkpoint-4"))
    assert snapshot(out) == before


def test_another_tools_files_are_never_touched(tiny, tmp_path, no_models):
    out = tmp_path / "theirs"
    for step in (1, 3):
        foreign_checkpoint(out, step)
    (out / "README.md").write_text("# my notes\n")
    (out / "args.json").write_text(json.dumps({"model_name_or_path": "bert"}))
    before = snapshot(out)
    for extra in (["--checkpoints_total_limit", "1"], ["--overwrite_output_dir"]):
        line = assert_clean_error(run(tiny, out, *extra), "files this trainer did not write", "checkpoint-1", "checkpoint-3", "README.md",
                                  "args.json", "--overwrite_output_dir", "--resume_from_checkpoint")
        assert "another --output_dir" in line
        assert snapshot(out) == before
    # 'latest' is never another tool's checkpoint
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "no complete checkpoint-N of this trainer")
    assert snapshot(out) == before


def test_overwrite_output_dir_deletes_only_this_trainers_files(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    cache = {k: v for k, v in snapshot(out).items() if k.startswith("embeddings_cache/")}
    old_run = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["run_id"]
    proc = run(tiny, out, "--overwrite_output_dir", steps=2, base=["--checkpointing_steps", "2", "--learning_rate", "1e-3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = proc.stdout[proc.stdout.index("--overwrite_output_dir: deleting"):]
    for name in ("checkpoint-4/", "checkpoint-2/", LORA_WEIGHTS_NAME, "args.json", "README.md", "peft_adapter/"):
        assert f"  deleted {name}" in listing, listing[:2000]
    assert "notes.txt" not in listing and "embeddings_cache" not in listing.split("):")[1]
    assert (out / "notes.txt").read_text() == "mine"
    assert {k: v for k, v in snapshot(out).items() if k.startswith("embeddings_cache/")} == cache  # reused, untouched
    assert [s for s, _ in list_checkpoints(str(out))] == [2]  # the old checkpoint-4 is gone: 'latest' is this run's
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["trainer"] == TRAINER_ID and state["run_id"] not in (None, old_run)
    assert not (out / "pytorch_lora_weights_ema.safetensors").exists()  # the old run's EMA file went with it


def test_overwrite_output_dir_does_not_go_with_resume(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out")
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"), "--overwrite_output_dir starts a new run",
                       "--resume_from_checkpoint")
    assert snapshot(out) == before


def test_resume_refuses_a_newer_checkpoint_of_another_tool(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out")
    foreign_checkpoint(out, 6)
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "8"), "checkpoint-6", "not written by this trainer",
                       "move it out of --output_dir")
    assert snapshot(out) == before


def own_state(folder, step, run_id):
    path = folder / f"checkpoint-{step}"
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"trainer": TRAINER_ID, "run_id": run_id, "global_step": step}))
    return path


def test_pruning_and_replacing_touch_only_this_runs_checkpoints(tmp_path):
    for step in (1, 3, 5, 10):
        own_state(tmp_path, step, "this")
    own_state(tmp_path, 2, "an earlier run")
    foreign_checkpoint(tmp_path, 4)
    prune_checkpoints(str(tmp_path), 1, current_step=5, run_id="this")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4, 5, 10]  # another run's, another tool's, the newer one
    tmp = tmp_path / ".tmp-checkpoint-4"
    tmp.mkdir()
    with pytest.raises(run_guard.UserError, match="not written by this trainer"):
        replace_folder(str(tmp), str(tmp_path / "checkpoint-4"))
    assert (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes() == b"their weights"


# ---------------------------------------------------------------------------------------------
# Exit 0 with a wrong result: runs that train nothing

def test_a_run_whose_every_update_is_skipped_fails_and_keeps_the_lora(tiny, finished, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path / "out")
    before = snapshot(out)
    real = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    proc = run(tiny, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "6", "--max_nonfinite_steps", "5")
    line = assert_clean_error(proc, "every update of this run (2 of 2) was skipped", "no final files were written",
                              f"Last good checkpoint: {out / 'checkpoint-4'}", "--noise_offset", status=1)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before and k != "args.json"} == {k: v for k, v in before.items() if k != "args.json"}, line


@pytest.mark.parametrize("argv, needles", [
    (["--lora_alpha", "1e30"], ["--lora_alpha 1e+30 with --rank 8 scales the LoRA by 1.25e+29", "--lora_alpha 8"]),
    (["--lora_alpha", "1e5", "--rank", "4", "--use_rslora"], ["scales the LoRA by 50000"]),
    (["--learning_rate", "1e30"], ["--learning_rate 1e+30 is above 10", "use 1e-4"]),
    (["--noise_offset", "1e30"], ["--noise_offset 1e+30 is above 1", "0.05-0.1"]),
])
def test_absurd_magnitudes_are_refused(argv, needles, capsys, tmp_path):
    out = tmp_path / "never"
    assert trainer.main(["--dataset", "data", "--output_dir", str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    flags.parse_args(["--dataset", "data", "--lora_alpha", "64", "--learning_rate", "1", "--noise_offset", "0.1"])  # large but sane


def test_a_caption_prefix_past_the_token_limit_is_refused_and_a_long_one_counted(tiny, tmp_path, no_models):
    out = tmp_path / "out"
    proc = run(tiny, out, "--caption_prefix", "word " * 80, base=[])
    assert_clean_error(proc, "--caption_prefix is", "tokens long", "fills the 77", "every caption would be cut off", "shorten it")
    assert not out.exists()
    from transformers import CLIPTokenizer

    from wuerstchen_lora.data import caption_stats

    tokenizer = CLIPTokenizer.from_pretrained(tiny["prior"], subfolder="tokenizer")
    rows = {"text": ["a", "a blue square, a blue square"]}
    assert caption_stats(rows, "text", tokenizer)["long_captions"] == 0
    length = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    prefix = next("sks, " * k for k in range(1, 77) if length("sks, " * k + rows["text"][1]) > 77)
    assert length(prefix + "a") <= 77
    assert caption_stats(rows, "text", tokenizer, prefix=prefix)["long_captions"] == 1  # the prefix counts


def test_resume_with_another_lr_scheduler_is_refused(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out")
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest", "--lr_scheduler", "constant_with_warmup"),
                       "--lr_scheduler constant (now constant_with_warmup)", "Resume with the checkpoint's settings")
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# The EMA state: safetensors, checked; a pickle is never run

class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["empty legacy state", "planted pickle", "truncated", "missing"])
def test_a_damaged_or_planted_ema_state_is_refused_before_models_load(tiny, finished, tmp_path, no_models, damage):
    out = copy_run(finished, tmp_path / "out")
    ckpt = out / "checkpoint-4"
    assert (ckpt / EMA_STATE_NAME).is_file() and not (ckpt / LEGACY_EMA_STATE_NAME).exists()  # written as safetensors
    marker = tmp_path / "pwned"
    if damage == "truncated":
        data = (ckpt / EMA_STATE_NAME).read_bytes()
        (ckpt / EMA_STATE_NAME).write_bytes(data[: len(data) // 2])
    else:
        (ckpt / EMA_STATE_NAME).unlink()
        if damage != "missing":
            torch.save({} if damage == "empty legacy state" else {"shadow_params": [Planted(marker)]}, ckpt / LEGACY_EMA_STATE_NAME)
    before = snapshot(out)
    why = {"empty legacy state": "holds no EMA weights", "planted pickle": "cannot be read safely", "truncated": "truncated", "missing": "is missing"}[damage]
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "cannot be resumed", why,
                       f"--resume_from_checkpoint {out / 'checkpoint-2'} --discard_newer_checkpoints")
    assert not marker.exists()
    assert snapshot(out) == before


def test_a_planted_pickle_beside_the_ema_state_is_never_loaded(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    marker = tmp_path / "pwned"
    torch.save({"shadow_params": [Planted(marker)]}, out / "checkpoint-4" / LEGACY_EMA_STATE_NAME)
    proc = run(tiny, out, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing left to train" in proc.stdout and not marker.exists()


def test_an_ema_state_of_an_earlier_version_resumes_through_the_safe_loader(tiny, finished, tmp_path):
    from safetensors.torch import load_file

    from wuerstchen_lora.outputs import EMA_WEIGHTS_NAME, read_ema_state

    out = copy_run(finished, tmp_path / "out")
    state, problem = read_ema_state(str(out / "checkpoint-4"))
    assert problem is None
    del state["names"]
    (out / "checkpoint-4" / EMA_STATE_NAME).unlink()
    torch.save(state, out / "checkpoint-4" / LEGACY_EMA_STATE_NAME)  # what accelerate wrote before (EMAModel.state_dict())
    (out / EMA_WEIGHTS_NAME).unlink()
    proc = run(tiny, out, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, original = load_file(out / EMA_WEIGHTS_NAME), load_file(finished / EMA_WEIGHTS_NAME)
    assert resumed.keys() == original.keys() and all(torch.equal(resumed[k], original[k]) for k in original)


def test_resuming_a_checkpoint_from_elsewhere_into_a_finished_run_is_refused(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out")
    for step in (2, 4):
        shutil.rmtree(out / f"checkpoint-{step}")  # only the finished run's final files
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", str(finished / "checkpoint-2")), "holds an earlier run",
                       LORA_WEIGHTS_NAME, "args.json", "another --output_dir")
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# The hub token; the merged prior

def test_hub_token_leaves_sys_argv_once_read(monkeypatch, capsys):
    argv = ["train_wuerstchen_prior_lora.py", "--dataset", "data", "--push_to_hub", "--hub_token", "hf_SECRET1", "--hub_model_id", "u/r"]
    monkeypatch.setattr(sys, "argv", list(argv))
    cfg = flags.parse_args()
    assert cfg.hub.hub_token == "hf_SECRET1" and "hf_SECRET1" not in " ".join(sys.argv) and "--hub_token" in sys.argv
    monkeypatch.setattr(sys, "argv", argv[:4] + ["--hub_token=hf_SECRET2"])
    assert flags.parse_args().hub.hub_token == "hf_SECRET2" and "hf_SECRET2" not in " ".join(sys.argv)
    assert "HF_TOKEN" in capsys.readouterr().err


def test_merged_prior_never_overwrites_the_base_and_follows_the_umask(tiny, finished, tmp_path):
    base = tmp_path / "base-prior"
    shutil.copytree(tiny["prior"], base)
    before = snapshot(base)
    for target in (base, base / "prior"):
        proc = run_script([INFER, "--checkpoint", finished, "--prior_model", base, "--save_merged_prior", target, "--device", "cpu"],
                          launcher="inprocess", check=False)
        assert_clean_error(proc, "--save_merged_prior", "base prior", "another folder")
    assert snapshot(base) == before
    old = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        run_script([INFER, "--checkpoint", finished, "--prior_model", base, "--save_merged_prior", out, "--device", "cpu"], launcher="inprocess")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


# ---------------------------------------------------------------------------------------------
# Data: symlinked subfolders are followed like symlinked files

def test_images_in_a_symlinked_subfolder_are_followed_like_symlinked_files(tmp_path):
    from PIL import Image

    from wuerstchen_lora.data import load_training_dataset

    def image(path, caption):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), "red").save(path)
        path.with_suffix(".txt").write_text(caption)

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    image(data / "own.png", "own")
    image(elsewhere / "folder" / "linked.png", "in a linked folder")
    image(elsewhere / "file.png", "a linked file")
    os.symlink(elsewhere / "folder", data / "10_linked")  # a kohya repeat folder that is a link
    os.symlink(elsewhere / "file.png", data / "file.png")
    os.symlink(elsewhere / "file.txt", data / "file.txt")
    os.symlink(data, data / "10_linked" / "loop")  # a link back up: not entered again
    stats = {}
    dataset, _, caption = load_training_dataset(str(data), stats=stats, folder_repeats=True)
    assert sorted(dataset[caption]) == ["a linked file", "in a linked folder", "own"]
    assert stats["folder_repeats"] == {"": 1, "10_linked": 10}


# ---------------------------------------------------------------------------------------------
# Unclear messages: an image over PIL's decompression-bomb limit, a dangling --output_dir link

def png_header(width, height):
    """A PNG that declares width x height and holds almost nothing: PIL refuses it by its header."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_an_image_over_the_bomb_limit_is_named_so_with_the_flag(tiny, tmp_path, no_models, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the flag set it
    data = tmp_path / "data"
    shutil.copytree(tiny["dataset"], data)
    (data / "huge.png").write_bytes(png_header(20000, 20000))
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "huge.png", "text": "a huge picture"}) + "\n")
    out = tmp_path / "out"

    def run(*extra):
        return run_script(train_args(tiny, out, dataset=data, extra=["--max_bad_images", "0", *extra]), launcher="inprocess", check=False)

    proc = run()
    line = assert_clean_error(proc, "huge.png: too many pixels (20000x20000 = 400,000,000 pixels, more than PIL's decompression-bomb limit of 178,956,970)",
                              "pass --max_image_pixels 400000000")
    assert "not an image" not in proc.stdout + line and not out.exists()
    # with the limit raised, the file is opened: this one is then found cut short, not a bomb
    assert_clean_error(run("--max_image_pixels", "400000000"), "huge.png: truncated or corrupt")
    assert not out.exists()


@pytest.mark.parametrize("where", ["the folder", "a folder above it"])
def test_a_dangling_symlink_output_dir_is_named_so(tiny, tmp_path, no_models, where):
    link = tmp_path / "link"
    os.symlink(tmp_path / "gone", link)
    out = link if where == "the folder" else link / "run"
    lines = [assert_clean_error(run(tiny, out, base=[]), f"--output_dir {out}", f"a symbolic link to {tmp_path / 'gone'}, which does not exist",
                                "dangling link", "create that folder")]
    lines.append(assert_clean_error(run(tiny, tmp_path / "out", "--embeddings_cache_dir", out, base=[]), f"--embeddings_cache_dir {out}", "dangling link"))
    proc = run_script([INFER, "--checkpoint", tiny["prior"], "--prompt", "x", "--output", out / "image.png"], launcher="inprocess", check=False)
    lines.append(assert_clean_error(proc, f"--output {out / 'image.png'} lies under {link}", "dangling link"))
    assert all("File exists" not in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"] and os.path.islink(link) and not (tmp_path / "gone").exists()


@pytest.mark.parametrize("targets, unknown", [("to_q,to_kk", "to_kk is"), ("attention,qkv", "attention, qkv are")])
def test_unknown_lora_target_modules_are_refused_before_models_load(tiny, tmp_path, no_models, targets, unknown):
    out = tmp_path / "out"
    assert_clean_error(run(tiny, out, "--lora_target_modules", targets, base=[]), f"--lora_target_modules: {unknown} not the name of any layer of this prior",
                       "attention.to_q", "channelwise.0", "--lora_targets attn|attn-mlp|all-linear")
    assert not out.exists()


def test_the_prior_layer_names_from_the_config_are_the_models(tiny):
    from wuerstchen_lora.models import WuerstchenPrior

    config = flags.read_prior_config(tiny["prior"])
    with torch.device("meta"):
        prior = WuerstchenPrior.from_config(config)
    layers = [n for n, m in prior.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(flags.prior_layer_names(config)) == sorted(layers)
    for preset in flags.LORA_TARGET_PRESETS.values():
        flags.check_lora_targets(preset, config)


def test_the_start_lines_say_where_datasets_keeps_its_copy_of_local_data(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load_frozen_models", lambda *a, **k: (_ for _ in ()).throw(run_guard.UserError("stopped once the data is read")))
    cache = tmp_path / "datasets-cache"
    proc = run(tiny, tmp_path / "out", "--cache_dir", cache, base=[])
    assert_clean_error(proc, "stopped once the data is read")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("data: a copy of the local data"))
    assert f"is kept by datasets in {cache}" in line and "MiB, Arrow" in line, line
    assert any(cache.rglob("*.arrow"))
    default = run(tiny, tmp_path / "out", base=[])
    assert "; --cache_dir DIR puts it elsewhere" in next(line for line in default.stdout.splitlines() if line.startswith("data: a copy of the local data"))
