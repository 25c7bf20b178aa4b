"""Resume checks what it resumes; no finished work is lost (checkpoint limits, newer checkpoints,
two runs in one folder, a full or read-only disk); files follow the user's umask.

Every refusal: exit status 2, one `error:` line naming the problem and the fix, no traceback,
decided before any model loads, and every file written earlier untouched."""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import assert_clean_error, run_script, train_args

from wuerstchen_lora import guard as run_guard
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, UserError
from wuerstchen_lora.outputs import TRAINER_ID, list_checkpoints, prune_checkpoints

STEPS = 4
BASE = ["--checkpointing_steps", "2", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One finished 4-step run with checkpoint-2 and checkpoint-4, written under umask 027."""
    out = tmp_path_factory.mktemp("finished") / "out"
    old = os.umask(0o027)
    try:
        run_script(train_args(tiny, out, steps=STEPS, extra=BASE), launcher="inprocess")
    finally:
        os.umask(old)
    return out


def copy_run(finished, dest, keep=(2, 4)):
    def ignore(folder, names):
        return [n for n in names if n.startswith("checkpoint-") and int(n.split("-")[1]) not in keep]

    shutil.copytree(finished, dest, ignore=ignore)
    return dest


def snapshot(folder):
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(tiny, out, *extra, steps=STEPS, dataset=None):
    return run_script(train_args(tiny, out, dataset=dataset, steps=steps, extra=BASE + list(extra)), launcher="inprocess", check=False)


# ---------------------------------------------------------------------------------------------
# Resume checks what it resumes

FIX = "Resume with the checkpoint's settings"


@pytest.mark.parametrize("extra, needles", [
    (["--rank", "4"], ["--rank 8 (now 4)", FIX]),
    (["--lora_alpha", "4"], ["--lora_alpha 8 (now 4)", FIX]),
    (["--use_dora"], ["--use_dora off (now on)", FIX]),
    (["--use_rslora"], ["--use_rslora off (now on)", FIX]),
    (["--lora_targets", "attn-mlp"], ["--lora_target_modules to_k,to_out.0,to_q,to_v (now channelwise.0", FIX]),
    (["--resolution", "96"], ["--resolution 64 (now 96)", FIX]),
    (["--aspect_ratio_buckets"], ["--aspect_ratio_buckets off (now on)", FIX]),
    (["--train_batch_size", "1"], ["--train_batch_size 2 (now 1)", FIX]),
    (["--gradient_accumulation_steps", "2"], ["--gradient_accumulation_steps 1 (now 2)", FIX]),
    (["--seed", "7"], ["--seed 42 (now 7)", FIX]),
    (["--optimizer", "adafactor"], ["--optimizer adamw (now adafactor)", FIX]),
    (["--use_ema"], ["--use_ema off (now on)", FIX]),
    (["--lr_scheduler", "cosine", "--max_train_steps", "8"], ["--max_train_steps 4 (now --max_train_steps 8; the cosine", FIX]),
    (["--max_train_steps", "3"], ["--max_train_steps 3 is below the step of", "(4)", "give --max_train_steps 4"]),
])
def test_changed_settings_are_refused_before_models_load(tiny, finished, tmp_path, no_models, extra, needles):
    out = copy_run(finished, tmp_path / "out")
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest", *extra), *needles)
    assert snapshot(out) == before


def test_other_data_is_refused_before_models_load(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out", keep=(2,))
    before = snapshot(out)
    data = tmp_path / "data"
    shutil.copytree(tiny["dataset"], data)
    metadata = data / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"text": "', '"text": "edited ', 1))
    line = assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest", dataset=str(data)),
                              "trained on other data", f"--dataset {tiny['dataset']} with 8 images (now {data} with 8 images", "Resume with the same data")
    assert "fingerprint" in line
    # the same data, another selection of it
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest", "--max_train_samples", "6"), "with 8 images (now", "with 6 images")
    assert snapshot(out) == before


def test_safe_changes_are_accepted_reported_and_applied(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "out", keep=(2,))
    moved = tmp_path / "moved-data"  # the same data in another folder is the same data
    shutil.copytree(tiny["dataset"], moved)
    proc = run(tiny, out, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-2", "--validation_steps", "3",
               "--checkpoints_total_limit", "5", dataset=str(moved))
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [line for line in proc.stdout.splitlines() if line.startswith("changed since checkpoint-2")]
    assert len(changed) == 1, proc.stdout[-3000:]
    for needle in ("--learning_rate 0.001 -> 0.01", "--validation_steps 100 -> 3", "--checkpoints_total_limit None -> 5", f"--dataset {tiny['dataset']} -> {moved}"):
        assert needle in changed[0]
    # the new learning rate took effect (the restored optimiser and schedule would have kept 1e-3)
    scheduler = torch.load(out / "checkpoint-4" / "scheduler.bin", weights_only=False)
    assert scheduler["base_lrs"] == [0.01] and scheduler["_last_lr"] == [0.01]
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert optimizer["param_groups"][0]["lr"] == 0.01
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["settings"]["rank"] == 8 and state["data"]["rows"] == 8
    assert state["config"]["optim"]["learning_rate"] == 0.01


@pytest.mark.parametrize("damage", ["optimizer.bin", LORA_WEIGHTS_NAME, "trainer_state.json"])
def test_damaged_checkpoint_names_the_file_and_an_earlier_one(tiny, finished, tmp_path, monkeypatch, damage):
    out = copy_run(finished, tmp_path / "out")
    target = out / "checkpoint-4" / damage
    data = target.read_bytes()
    target.write_bytes(b"{not json" if damage.endswith(".json") else data[: len(data) // 2])
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(trainer, "load_frozen_models", lambda *a, **k: pytest.fail("models loaded"))
        assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), f"{target} ",
                           f"--resume_from_checkpoint {out / 'checkpoint-2'} --discard_newer_checkpoints")
    assert snapshot(out) == before
    if damage == "optimizer.bin":  # the advice works
        proc = run(tiny, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--discard_newer_checkpoints")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
        assert run_guard.checkpoint_problem(str(out / "checkpoint-4"), sharded=False) is None


def test_a_folder_that_is_not_a_checkpoint_is_refused_before_anything(tiny, tmp_path, no_models):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    out = tmp_path / "new-out"
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", str(folder)), "not a complete checkpoint", "trainer_state.json")
    assert not out.exists()  # no cache, no lock, no folder


def test_settings_only_the_launch_can_change():
    old = {"num_processes": 2, "mixed_precision": "bf16", "distributed_type": "MULTI_GPU"}
    new = {**{k: None for k, _ in run_guard.MUST_MATCH}, "num_processes": 1, "distributed_type": "NO", "mixed_precision": "fp16",
           "lr_scheduler": "constant", "max_train_steps": 4, "num_train_epochs": 1}
    errors = run_guard._setting_errors(old, new)
    assert errors[0] == "process count 2 (now 1; launch with --num_processes 2)"
    assert "--mixed_precision bf16 (now fp16" in errors[1] and len(errors) == 2


# ---------------------------------------------------------------------------------------------
# No finished work lost: newer checkpoints, the checkpoint limit

def test_older_checkpoint_needs_discard_then_latest_is_right(tiny, finished, tmp_path, no_models):
    out = copy_run(finished, tmp_path / "out")
    before = snapshot(out)
    assert_clean_error(run(tiny, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--checkpoints_total_limit", "1"),
                       "is at step 2", "newer checkpoints (checkpoint-4)", "--discard_newer_checkpoints")
    assert snapshot(out) == before
    assert_clean_error(run(tiny, out, "--discard_newer_checkpoints"), "only goes with --resume_from_checkpoint")
    assert snapshot(out) == before


def test_discard_newer_checkpoints_with_a_limit_keeps_the_new_ones(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    proc = run(tiny, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--discard_newer_checkpoints",
               "--checkpoints_total_limit", "1", "--checkpointing_steps", "1", "--learning_rate", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--discard_newer_checkpoints: deleted checkpoint-4" in proc.stdout
    assert [s for s, _ in list_checkpoints(str(out))] == [4]  # this run's, not the discarded one
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["config"]["optim"]["learning_rate"] == 0.01


def test_checkpoint_limit_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (1, 3, 5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step, "trainer": TRAINER_ID, "run_id": "r"}))
    prune_checkpoints(str(tmp_path), 1, current_step=5, run_id="r")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5, 10]  # the newer one is not this run's to delete


# ---------------------------------------------------------------------------------------------
# Two runs in one output folder

def test_a_second_run_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(tiny, finished, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = out / run_guard.LOCK_NAME
        lock.write_text(json.dumps(run_guard.lock_record(pid=other.pid)))
        before = snapshot(out)
        with monkeypatch.context() as m:
            m.setattr(trainer, "load_frozen_models", lambda *a, **k: pytest.fail("models loaded"))
            assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "is in use by another run",
                               f"pid {other.pid} on {socket.gethostname()}", str(lock))
        assert snapshot(out) == before
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is stale and taken over; the checkpoint is at the last step, so
    # the run only writes the final files
    proc = run(tiny, out, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing left to train" in proc.stdout
    assert not lock.exists()


def test_lock_of_another_host_is_respected(tmp_path):
    lock = tmp_path / run_guard.LOCK_NAME
    lock.write_text(json.dumps(run_guard.lock_record(pid=999999, host="another-machine")))
    with pytest.raises(UserError, match="pid 999999 on another-machine"):
        run_guard.acquire_run_lock(str(tmp_path))
    lock.unlink()
    run_guard.acquire_run_lock(str(tmp_path))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    run_guard.release_run_lock()
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# A full disk, a read-only folder

@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        import gc

        gc.collect()  # the in-process runs' open cache files
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)  # still busy: detach now, freed when closed


def fill(folder, leave):
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    if leave == 0:  # the rest, whatever the block accounting left
        with contextlib.suppress(OSError), open(os.path.join(folder, "filler2"), "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()


def no_temporaries(folder):
    return [str(p) for p in folder.rglob(".tmp-*")]


def test_a_full_disk_gives_one_line_and_keeps_earlier_files(tiny, finished, tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = copy_run(finished, disk / "out", keep=(2,))
        # room for the lock and args.json, not for checkpoint-4 (about 90 kB)
        fill(disk, leave=48 * 1024)
        before = snapshot(out)
        line = assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "the disk is full", "free some space",
                                  "--resume_from_checkpoint latest")
        assert "checkpoint-4" in line
        after = snapshot(out)
        assert {k: v for k, v in after.items() if k != "args.json"} == {k: v for k, v in before.items() if k != "args.json"}
        json.loads((out / "args.json").read_text())  # rewritten when the run started, never half-written
        assert not no_temporaries(disk) and not (out / run_guard.LOCK_NAME).exists()
        assert [s for s, _ in list_checkpoints(str(out))] == [2]

        # full from the start: refused before anything, args.json untouched
        fill(disk, leave=0)
        before = snapshot(out)
        assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "the disk is full")
        assert snapshot(out) == before and not no_temporaries(disk)


def test_a_read_only_folder_gives_one_line(tiny, finished, tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = copy_run(finished, disk / "out", keep=(2,))
        before = snapshot(out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert_clean_error(run(tiny, out, "--resume_from_checkpoint", "latest"), "read-only", "choose a writable --output_dir")
        assert_clean_error(run(tiny, disk / "new"), "read-only", "choose a writable --output_dir")
        assert snapshot(out) == before


def test_write_failures_are_recognised_however_they_are_raised(tmp_path):
    import errno

    args = str(tmp_path)  # the output folder
    full = run_guard.write_failure_message(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), args)
    assert full.startswith(f"cannot write {tmp_path}: the disk is full") and "free some space" in full
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x.json"))
    assert run_guard.write_failure_message(wrapped, args).startswith(f"cannot write {tmp_path / 'x.json'}: the file system is read-only")
    denied = run_guard.write_failure_message(PermissionError(errno.EACCES, "Permission denied", "/data/img.png"), args)
    assert denied.startswith("cannot access /data/img.png: permission denied")
    assert run_guard.write_failure_message(ValueError("something else"), args) is None


# ---------------------------------------------------------------------------------------------
# File modes

def test_files_follow_the_umask(finished):
    files = [p for p in finished.rglob("*") if p.is_file()]
    names = {str(p.relative_to(finished)) for p in files}
    assert {"args.json", LORA_WEIGHTS_NAME, "training_info.json", "README.md", "checkpoint-4/trainer_state.json",
            "checkpoint-4/" + LORA_WEIGHTS_NAME, "peft_adapter/adapter_model.safetensors"} <= names
    assert any(n.startswith("embeddings_cache/") for n in names)
    wrong = {str(p.relative_to(finished)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o640}
    assert not wrong, wrong
    assert not (finished / run_guard.LOCK_NAME).exists()
