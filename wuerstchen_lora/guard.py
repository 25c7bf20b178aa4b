"""Guards around a training run, all decided before any model loads:

- one run per output folder: an advisory lock file (`.trainer.lock`, the owner's pid and host);
  a lock whose pid is dead on this host is stale and taken over;
- resume only what fits: the checkpoint records what it depends on (LoRA shape and variant,
  resolution and buckets, the training data, batch layout, process count, seed, the step budget),
  its files are checked for damage, and resuming it next to newer checkpoints is refused unless
  --discard_newer_checkpoints says what to do with them;
- a new run never overwrites a finished one: a folder that holds an earlier run is refused unless
  --overwrite_output_dir (which deletes only this trainer's files), and files another tool wrote
  are refused always (fresh_output_dir); checkpoints record the trainer and run that wrote them;
- a write that fails (a full disk, a read-only or forbidden folder) becomes one `error:` line.
"""

import dataclasses
import errno
import hashlib
import json
import os
import socket
import struct
import time
import uuid
import zipfile
from typing import Optional

from wuerstchen_lora.models import LORA_WEIGHTS_NAME, TRAINING_INFO_NAME, UserError, decided_on_main
from wuerstchen_lora.outputs import (
    CHECKPOINT_RE,
    TRAINER_ID,
    TRAINER_STATE_NAME,
    checkpoint_owner,
    earlier_run,
    list_checkpoints,
    own_checkpoints,
)

LOCK_NAME = ".trainer.lock"
STATE_FORMAT = 2
# Schedules whose shape does not depend on the run's length: --max_train_steps may change on resume.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# What a resumed run depends on: a change is refused. (key, how the message names it)
MUST_MATCH = (
    ("rank", "--rank"), ("lora_alpha", "--lora_alpha"), ("lora_target_modules", "--lora_target_modules"),
    ("use_dora", "--use_dora"), ("use_rslora", "--use_rslora"), ("resolution", "--resolution"),
    ("aspect_ratio_buckets", "--aspect_ratio_buckets"), ("train_batch_size", "--train_batch_size"),
    ("gradient_accumulation_steps", "--gradient_accumulation_steps"), ("num_processes", "the process count"),
    ("seed", "--seed"), ("repeats", "--repeats"), ("optimizer", "--optimizer"), ("use_ema", "--use_ema"),
    ("distributed_type", "the distributed set-up"), ("with_prior_preservation", "--with_prior_preservation"),
    ("lr_scheduler", "--lr_scheduler"),  # the schedule's kind: another one makes the learning rate jump mid-run
    ("no_folder_repeats", "--no_folder_repeats"),  # kohya's repeat folders: what an epoch is
)
# Arguments never reported as changed on resume.
NOT_REPORTED = {"resume_from_checkpoint", "discard_newer_checkpoints", "training_data"}


# ----------------------------------------------------------------------------------------------
# One run per output folder


_HELD = []  # (lock path, token, output folder if this run created it)


def lock_record(pid=None, host=None, token=None):
    return {"pid": pid or os.getpid(), "host": host or socket.gethostname(), "token": token or uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _read_lock(path):
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def acquire_run_lock(output_dir):
    """Create OUTPUT/.trainer.lock for this process, or refuse while another live run holds it.

    Advisory: it keeps two runs of this trainer apart, nothing else. Created with O_EXCL, so of two
    runs starting together one wins; a lock left by a killed run (dead pid, same host) is replaced.
    """
    created = None
    if not os.path.isdir(output_dir):
        created = os.path.abspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    record = lock_record()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is None:  # being written this instant, or garbage left by a crash
                try:
                    age = time.time() - os.path.getmtime(path)
                except OSError:
                    continue
                if age < 10:
                    time.sleep(0.2)
                    continue
            elif owner.get("host") != record["host"] or (owner["pid"] != os.getpid() and _pid_alive(owner["pid"])):
                raise UserError(
                    f"--output_dir {output_dir} is in use by another run (pid {owner['pid']} on {owner.get('host')}, "
                    f"started {owner.get('started', '?')}); wait for it to finish or use another --output_dir "
                    f"(if that run is gone, delete {path})"
                )
            try:  # stale: its process is gone (or it is this process's own leftover)
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            _remove_if_empty(created)
            raise OSError(e.errno, e.strerror, path) from e
        os.close(fd)
        _HELD.append((path, record["token"], created))
        return path
    raise UserError(f"could not take the lock {path}; if no run is using --output_dir {output_dir}, delete it")


def _remove_if_empty(folder):
    if folder:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def release_run_lock():
    """Remove the locks this process holds (called when main() ends, however it ends). A folder the
    run created and left empty (it stopped before writing anything) goes too."""
    while _HELD:
        path, token, created = _HELD.pop()
        owner = _read_lock(path)
        if owner is not None and owner.get("token") == token:
            try:
                os.unlink(path)
            except OSError:
                pass
        _remove_if_empty(created)


def lock_output_dir(output_dir, accelerator):
    """The main process takes the lock (under several processes or machines only global rank 0);
    every process learns the outcome, so all stop together when it is refused."""
    message = None
    if accelerator.is_main_process:
        try:
            acquire_run_lock(output_dir)
        except UserError as e:
            message = str(e)
        except OSError as e:
            message = write_failure_message(e, output_dir) or f"cannot create {os.path.join(output_dir, LOCK_NAME)}: {e}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message:
        raise UserError(message)


# ----------------------------------------------------------------------------------------------
# Write failures


WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
_TEXT_ERRNOS = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
                ("Read-only file system", errno.EROFS), ("os error 30", errno.EROFS))


def _write_errno(exc):
    """(errno, file name) of a write failure anywhere in an exception's chain, else (None, None)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_PROBLEMS:
            return exc.errno, exc.filename
        for text, code in _TEXT_ERRNOS:
            if text in str(exc):
                return code, None
        exc = exc.__cause__ or exc.__context__
    return None, None


def disk_problem(folder):
    """ENOSPC or EROFS when the file system holding `folder` is full or read-only now, else None.
    For libraries whose write errors do not say why (torch.save: 'unexpected pos ...')."""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder or ".")
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < (1 << 20):
        return errno.ENOSPC
    return None


def write_failure_message(exc, output_dir=None):
    """One line for a failed write (full disk, read-only or forbidden folder), or None."""
    code, filename = _write_errno(exc)
    if code is None:
        return None
    where = filename or output_dir or "the output folder"
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or choose another --output_dir"
    elif code == errno.EROFS:
        fix = "choose a writable --output_dir"
    else:  # also a file the run only reads: say what it is about, not "write"
        fix = "check its permissions (the run writes only under --output_dir and the cache folders)"
        return f"cannot access {where}: {WRITE_PROBLEMS[code]} ({os.strerror(code)}); {fix}"
    resume = ""
    if output_dir and list_checkpoints(output_dir):
        resume = "; then continue with --resume_from_checkpoint latest"
    return f"cannot write {where}: {WRITE_PROBLEMS[code]} ({os.strerror(code)}); {fix}{resume} (files written before are intact)"


# ----------------------------------------------------------------------------------------------
# What a checkpoint records


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


# The configuration fields a checkpoint cannot be resumed without: the adapter's shape, what a
# sample and a step are, the optimiser state's kind, and the length of a decaying schedule.
RESUME_FIELDS = ("rank", "lora_alpha", "lora_target_modules", "use_dora", "use_rslora", "resolution", "aspect_ratio_buckets",
                 "train_batch_size", "gradient_accumulation_steps", "seed", "repeats", "optimizer", "use_ema",
                 "max_train_steps", "num_train_epochs", "lr_scheduler", "mixed_precision", "with_prior_preservation", "no_folder_repeats")


def run_settings(cfg, accelerator):
    """What a resume depends on: RESUME_FIELDS of the configuration, and the process layout."""
    flat = cfg.flat()
    settings = {k: flat[k] for k in RESUME_FIELDS}
    settings["lora_alpha"] = float(settings["lora_alpha"])
    settings["lora_target_modules"] = sorted(settings["lora_target_modules"])
    settings["num_processes"] = accelerator.num_processes
    settings["distributed_type"] = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    return settings


def checkpoint_state(cfg, training_data, accelerator, global_step, run_id=None):
    """The content of checkpoint-N/trainer_state.json: who wrote it (this trainer, which run), the
    whole configuration, and the data's fingerprint."""
    return {
        "trainer": TRAINER_ID,
        "run_id": run_id,
        "format": STATE_FORMAT,
        "global_step": global_step,
        "seed": cfg.seed,
        "num_processes": accelerator.num_processes,
        "settings": run_settings(cfg, accelerator),
        "data": training_data,
        "config": cfg.to_dict(),
    }


def data_fingerprint(source, dataset, columns):
    """The rows a run trains on, in order: each image's name (relative to the dataset) and size, or
    a hash of its bytes when the dataset holds them, and its caption(s). Cheap (no decoding; file
    sizes, not contents) and stable: moving the dataset folder keeps it, editing a caption or
    replacing, adding or removing an image changes it, and so does another --max_train_samples,
    --validation_split or bucket selection."""
    import datasets

    image_column, caption_column = columns
    base = os.path.abspath(source) if os.path.exists(source) else None
    if base and os.path.isfile(base):
        base = os.path.dirname(base)
    h = hashlib.sha256()
    raw = dataset.cast_column(image_column, datasets.Image(decode=False)).select_columns([image_column, caption_column])
    for batch in raw.iter(batch_size=256):
        for image, caption in zip(batch[image_column], batch[caption_column]):
            image = image if isinstance(image, dict) else {"path": image, "bytes": None}
            if image.get("bytes") is not None:
                ident = "bytes:" + hashlib.blake2b(image["bytes"], digest_size=16).hexdigest()
            else:
                path = image.get("path") or ""
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = -1
                name = os.path.relpath(path, base) if base and os.path.isabs(path) else os.path.basename(path)
                ident = f"file:{name}:{size}"
            h.update(json.dumps([ident, caption], default=str).encode() + b"\n")
    return {"dataset": source, "rows": len(dataset), "fingerprint": h.hexdigest()[:16]}


# ----------------------------------------------------------------------------------------------
# Checking a checkpoint before resuming it


class ResumePlan:
    def __init__(self, path, step, state, newer):
        self.path, self.step, self.state, self.newer = path, step, state, newer

    @property
    def old_args(self):
        """The checkpoint's configuration as {field: value} (earlier versions recorded it flat, as "args")."""
        from wuerstchen_lora.config import flatten_record

        return flatten_record(self.state.get("config") or self.state.get("args"))


def _damaged(path, name, why, earlier):
    file = os.path.join(path, name)
    if earlier:
        fix = f"resume from the newest readable one instead: --resume_from_checkpoint {earlier} --discard_newer_checkpoints"
    else:
        fix = "no earlier checkpoint is readable; start without --resume_from_checkpoint (in another --output_dir to keep this one)"
    return UserError(f"checkpoint {path} cannot be resumed: {file} {why}; {fix}")


def read_state(path):
    """trainer_state.json as a dict, or the reason it cannot be used."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None, "is missing (the checkpoint is incomplete)"
    except (OSError, ValueError) as e:
        return None, f"is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
        return None, "is damaged (no global_step)"
    return state, None


def _safetensors_problem(file):
    """Header parse and size check: a truncated or overwritten file shows here, without loading it."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is truncated"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                return "is truncated or not a safetensors file"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"is damaged ({type(e).__name__})"
    if 8 + n + end != size:
        return f"is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def _torch_file_problem(file):
    """accelerate's optimizer, scheduler, RNG and scaler files are torch zip archives: a truncated
    one has no central directory; the CRCs catch damage inside (read, not unpickled)."""
    try:
        with zipfile.ZipFile(file) as archive:
            if os.path.getsize(file) < (1 << 30) and archive.testzip() is not None:
                return "is damaged (checksum mismatch)"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"is truncated or damaged ({type(e).__name__})"
    return None


def checkpoint_problem(path, sharded):
    """(file name, what is wrong) for the first unusable file of a checkpoint, or None."""
    state, why = read_state(path)
    if why:
        return TRAINER_STATE_NAME, why
    required = () if sharded else (LORA_WEIGHTS_NAME, "optimizer.bin")
    for name in required:
        if not os.path.isfile(os.path.join(path, name)):
            return name, "is missing"
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(file)
        elif name.endswith((".bin", ".pkl", ".pt")):
            problem = _torch_file_problem(file)
        else:
            continue
        if problem:
            return name, problem
    return None


def earlier_readable_checkpoint(path, sharded):
    """The newest checkpoint beside `path` with a smaller step that passes checkpoint_problem."""
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    step = int(m.group(1)) if m else None
    for s, other in reversed(list_checkpoints(os.path.dirname(os.path.normpath(path)) or ".")):
        if (step is None or s < step) and os.path.normpath(other) != os.path.normpath(path) and checkpoint_problem(other, sharded) is None:
            return other
    return None


def _old_settings(path, state):
    """What a checkpoint from before trainer_state.json recorded settings still tells: the LoRA
    config and resolution from its training_info.json, the seed and process count."""
    settings = {k: state[k] for k in ("seed", "num_processes") if k in state}
    try:
        with open(os.path.join(path, TRAINING_INFO_NAME)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return settings
    lora = info.get("lora") or {}
    for key, name in (("rank", "r"), ("lora_alpha", "lora_alpha"), ("use_dora", "use_dora"), ("use_rslora", "use_rslora")):
        if name in lora:
            settings[key] = float(lora[name]) if key == "lora_alpha" else lora[name]
    if lora.get("target_modules"):
        settings["lora_target_modules"] = sorted(lora["target_modules"])
    if "resolution" in info:
        settings["resolution"] = info["resolution"]
    return settings


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def _setting_errors(old, new):
    """Changed settings the checkpoint depends on, each as 'what was X, now Y'."""
    changed = []
    for key, flag in MUST_MATCH:
        if key not in old or old[key] == new[key]:
            continue
        if key == "distributed_type" and old.get("num_processes") != new["num_processes"]:
            continue  # the process count already says it
        if key == "num_processes":
            changed.append(f"process count {old[key]} (now {new[key]}; launch with --num_processes {old[key]})")
        else:
            changed.append(f"{flag} {_show(old[key])} (now {_show(new[key])})")
    if new["mixed_precision"] == "fp16" and old.get("mixed_precision") not in (None, "fp16"):
        changed.append(f"--mixed_precision {old['mixed_precision']} (now fp16: the checkpoint has no fp16 gradient-scaler state)")
    if "max_train_steps" in old and new["lr_scheduler"] not in LENGTH_FREE_SCHEDULES:
        old_len = (old["max_train_steps"], None if old["max_train_steps"] else old.get("num_train_epochs"))
        new_len = (new["max_train_steps"], None if new["max_train_steps"] else new["num_train_epochs"])
        if old_len != new_len:
            was = f"--max_train_steps {old_len[0]}" if old_len[0] else f"--num_train_epochs {old_len[1]}"
            now = f"--max_train_steps {new_len[0]}" if new_len[0] else f"--num_train_epochs {new_len[1]}"
            changed.append(f"{was} (now {now}; the {new['lr_scheduler']} learning-rate schedule is laid out over the whole run)")
    return changed


def resume_path(output_dir, resume_from_checkpoint, discard_newer_checkpoints=False, tell=None):
    """The checkpoint folder --resume_from_checkpoint names ('latest': the newest complete one in
    --output_dir), or None without the flag; a missing or incomplete one is a UserError. 'latest'
    with no checkpoint-N at all starts a new run (the diffusers example's and kohya's habit: a job
    script may always pass it), said in a `note:` line through `tell`; the new run is then checked
    like any other (fresh_output_dir). Called by the flag checks (before anything is written, with
    `tell`) and by plan_resume."""
    if not resume_from_checkpoint:
        if discard_newer_checkpoints:
            raise UserError("--discard_newer_checkpoints only goes with --resume_from_checkpoint (it deletes the checkpoints newer than the one resumed)")
        return None
    if resume_from_checkpoint == "latest":
        found = own_checkpoints(output_dir, damaged=True)  # another tool's checkpoint-N is never "latest"
        if not found:
            others = sorted((n for n in os.listdir(output_dir) if CHECKPOINT_RE.match(n)), key=lambda n: int(CHECKPOINT_RE.match(n).group(1))) if os.path.isdir(output_dir) else []
            if others:
                raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint-N of this trainer in {output_dir} "
                                f"({', '.join(others[:4])}: incomplete, or another tool's); start without the flag, or choose another --output_dir")
            if discard_newer_checkpoints:
                raise UserError("--discard_newer_checkpoints only goes with a checkpoint to resume; "
                                f"--resume_from_checkpoint latest found none in {output_dir}")
            if tell is not None:
                tell(f"note: --resume_from_checkpoint latest: no checkpoint in {output_dir} yet, so this is a new run from step 0")
            return None
        return found[-1][1]
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        raise UserError(f"--resume_from_checkpoint {path}: no such folder; give a checkpoint-N folder or 'latest'")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE_NAME}); "
                        f"give a checkpoint-N folder written by this trainer, or 'latest'")
    return path


def plan_resume(cfg, accelerator):
    """Resolve --resume_from_checkpoint and check it against this run, reading only small files.
    Returns None (no resume) or a ResumePlan; raises UserError with one line otherwise."""
    from wuerstchen_lora.outputs import sharded_engine

    out, optim = cfg.output, cfg.optim
    path = resume_path(out.output_dir, out.resume_from_checkpoint, out.discard_newer_checkpoints)
    if path is None:
        return None
    sharded = sharded_engine(accelerator)
    problem = checkpoint_problem(path, sharded)
    if problem:
        raise _damaged(path, problem[0], problem[1], earlier_readable_checkpoint(path, sharded))
    state, _ = read_state(path)
    step = state["global_step"]
    if optim.max_train_steps is not None and optim.max_train_steps < step:
        old_max = (state.get("settings") or {}).get("max_train_steps")
        raise UserError(f"--max_train_steps {optim.max_train_steps} is below the step of {path} ({step}), so the run would already be over; "
                        f"give --max_train_steps {old_max or step} (the checkpoint's)" + (" or more" if optim.lr_scheduler in LENGTH_FREE_SCHEDULES else ""))
    old = state.get("settings") or _old_settings(path, state)
    changed = _setting_errors(old, run_settings(cfg, accelerator))
    if changed:
        raise UserError(f"{path} was trained with other settings: {'; '.join(changed)}. Resume with the checkpoint's settings, "
                        f"or start a new run (without --resume_from_checkpoint, in another --output_dir)")
    if optim.use_ema:
        problem = ema_state_problem(path)
        if problem:
            raise _damaged(path, problem[0], problem[1], earlier_readable_checkpoint(path, sharded))
    foreign = [name for name in sorted(os.listdir(out.output_dir)) if CHECKPOINT_RE.match(name) and int(CHECKPOINT_RE.match(name).group(1)) > step
               and os.path.isdir(os.path.join(out.output_dir, name)) and checkpoint_owner(os.path.join(out.output_dir, name))[0] is False] if os.path.isdir(out.output_dir) else []
    if foreign:
        raise UserError(f"{out.output_dir} holds {', '.join(foreign)}, not written by this trainer, where this run will write its own checkpoints; "
                        f"move {'them' if len(foreign) > 1 else 'it'} out of --output_dir and resume again")
    newer = [p for s, p in own_checkpoints(out.output_dir, damaged=True) if s > step]
    if newer and not out.discard_newer_checkpoints:
        names = ", ".join(os.path.basename(p) for p in newer)
        raise UserError(f"--resume_from_checkpoint {path} is at step {step}, but {out.output_dir} holds newer checkpoints ({names}) "
                        f"that 'latest' would pick over this run's; resume with --resume_from_checkpoint latest, "
                        f"or add --discard_newer_checkpoints to delete them")
    return ResumePlan(path, step, state, newer)


def check_training_data(plan, source, dataset, columns):
    """After the data is loaded and checked (before models): its fingerprint, to record; a
    checkpoint trained on other data is refused."""
    new = data_fingerprint(source, dataset, columns)
    old = plan.state.get("data") if plan is not None else None
    if old and old.get("fingerprint") != new["fingerprint"]:
        raise UserError(
            f"{plan.path} was trained on other data: --dataset {old.get('dataset')} with {old.get('rows')} images "
            f"(now {new['dataset']} with {new['rows']} images; fingerprint {old.get('fingerprint')} -> {new['fingerprint']}). "
            f"Resume with the same data and selection (--dataset, --max_train_samples, --validation_split, --bucket_max_upscale), "
            f"or start a new run in another --output_dir"
        )
    return new


def ema_state_problem(path):
    """(file, what is wrong) when a checkpoint holds no usable EMA state, else None. Read before any
    model loads: the safetensors header, or a legacy pickle through torch.load(weights_only=True),
    which refuses anything but tensors and plain values (never runs code from the file)."""
    from wuerstchen_lora.outputs import read_ema_state

    return read_ema_state(path)[1]


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What guard_run decided: the checkpoint to resume (or None), the run's identity (recorded in
    every checkpoint; kept on resume), and what --overwrite_output_dir deletes once training starts."""

    plan: Optional[ResumePlan]
    run_id: Optional[str]
    earlier_files: tuple = ()


def fresh_output_dir(output):
    """For a run without --resume_from_checkpoint: what --output_dir holds of an earlier run, to be
    deleted by --overwrite_output_dir; refused without that flag, and always refused for files
    this trainer did not write (a run would overwrite or mix with them). `output`: OutputConfig."""
    folder = output.output_dir
    ours, foreign = earlier_run(folder, output.logging_dir)

    def names(items):
        return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

    if foreign:
        raise UserError(f"--output_dir {folder} holds files this trainer did not write ({names(foreign)}) that a new run would overwrite or mix "
                        f"with its own; choose another --output_dir (--overwrite_output_dir deletes only this trainer's own files, "
                        f"--resume_from_checkpoint resumes only its own checkpoints)")
    if ours and not output.overwrite_output_dir:
        resumable = own_checkpoints(folder)
        resume = ("continue it with --resume_from_checkpoint latest" if resumable
                  else "it has no checkpoint for --resume_from_checkpoint to continue")
        raise UserError(f"--output_dir {folder} holds an earlier run ({names(ours)}); {resume}, start it over with --overwrite_output_dir "
                        f"(deletes that run's files, keeps the embeddings cache), or choose another --output_dir")
    return tuple(ours)


def guard_run(cfg, accelerator):
    """At the start of setup: the lock, then the resume checks, or for a new run the check that
    --output_dir holds no earlier run. Returns a RunStart."""
    lock_output_dir(cfg.output.output_dir, accelerator)
    plan = plan_resume(cfg, accelerator)
    here = plan is not None and os.path.realpath(os.path.dirname(os.path.normpath(plan.path))) == os.path.realpath(cfg.output.output_dir)
    if here:
        return RunStart(plan, plan.state.get("run_id"))
    # A new run, or a checkpoint from another folder continued in this one: this one must not hold an earlier run.
    # One process decides (and later deletes): the others might see it half-done.
    earlier = decided_on_main(accelerator, lambda: fresh_output_dir(cfg.output), default=())
    return RunStart(plan, plan.state.get("run_id") if plan else uuid.uuid4().hex, earlier)


def changed_settings(plan, cfg):
    """'--flag old -> new' for every configuration field that differs from the checkpoint's, field
    by field (the safe ones: anything that mattered was refused before)."""
    old_args = plan.old_args
    new_args = _json_value({k: v for k, v in cfg.flat().items() if k not in NOT_REPORTED})
    return [f"--{k} {_show(old_args[k])} -> {_show(v)}" for k, v in sorted(new_args.items())
            if k in old_args and k not in NOT_REPORTED and old_args[k] != v]
