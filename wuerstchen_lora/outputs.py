"""What a training run writes: resumable checkpoints, the final LoRA file, the model card and
the JSON files that describe the run (infer.py reads `training_info.json`).

Every file is written under a temporary name and renamed into place; a checkpoint folder is
renamed into place once complete, so `latest` never picks a half-written one.
"""

import json
import os
import re
import shutil
import sys

import torch

from wuerstchen_lora.models import (
    LORA_WEIGHTS_NAME,
    PEFT_ADAPTER_DIR,
    TRAINING_INFO_NAME,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    decided_on_main,
    lora_config_dict,
    lora_digest,
    output_size_for_training_resolution,
    save_lora_file,
    save_peft_adapter,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
EMA_WEIGHTS_NAME = "pytorch_lora_weights_ema.safetensors"
EMA_STATE_NAME = "ema_state.safetensors"  # a checkpoint's EMA state (never a pickle: ema_state_problem)
LEGACY_EMA_STATE_NAME = "custom_checkpoint_0.pkl"  # what accelerate wrote for it before: read with weights_only=True only
# Recorded in every checkpoint's trainer_state.json: the trainer deletes and prunes only what it wrote.
TRAINER_ID = "wuerstchen_lora.train_wuerstchen_prior_lora"
# What a finished (or interrupted) run leaves at the top of --output_dir besides its checkpoints.
RUN_FILES = (LORA_WEIGHTS_NAME, EMA_WEIGHTS_NAME, PEFT_ADAPTER_DIR, TRAINING_INFO_NAME, "args.json", "README.md")
# Written by a run too, but no sign of one on their own (kept by a fresh run, deleted by --overwrite_output_dir
# with the run they belong to). The embeddings cache is never deleted: it is keyed by its content.
RUN_EXTRAS = ("loss_curve.png", "validation_grid.png", "validation")


def list_checkpoints(output_dir):
    """Complete checkpoints as (step, path), oldest first; a folder without its state file is ignored."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                found.append((int(m.group(1)), path))
    return sorted(found)


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_owner(path):
    """(written by this trainer: True, False, or None when its trainer_state.json is unreadable; its
    run id) of a checkpoint-N folder. Checkpoints from before the identity was recorded are
    recognised by their layout (a trainer_state.json with the recorded configuration beside the
    LoRA file); their run id is None."""
    file = os.path.join(path, TRAINER_STATE_NAME)
    state = _read_json(file)
    if state is None:
        return (None if os.path.isfile(file) else False), None
    if state.get("trainer") == TRAINER_ID:
        return True, state.get("run_id")
    legacy = isinstance(state.get("global_step"), int) and any(isinstance(state.get(k), dict) for k in ("settings", "config", "args"))
    return legacy and os.path.isfile(os.path.join(path, LORA_WEIGHTS_NAME)), None


def own_checkpoints(output_dir, run_id=False, damaged=False):
    """list_checkpoints, only those this trainer wrote; with `run_id` (None included: a run from
    before run ids), only that run's; with `damaged`, also those whose state file is unreadable
    (for 'latest', so that the damage is reported, and for --discard_newer_checkpoints)."""
    found = []
    for step, path in list_checkpoints(output_dir):
        ours, rid = checkpoint_owner(path)
        if (ours or damaged and ours is None) and (run_id is False or rid == run_id):
            found.append((step, path))
    return found


def _file_is_ours(output_dir, name):
    """Whether a top-level run file was written by this trainer (judged by its content)."""
    path = os.path.join(output_dir, name)
    if name == "args.json":
        from wuerstchen_lora.config import flatten_record

        record = flatten_record(_read_json(path))
        return "pretrained_prior_model_name_or_path" in record and "rank" in record
    if name == TRAINING_INFO_NAME:
        info = _read_json(path) or {}
        return "base_model" in info and "lora" in info and "global_step" in info
    if name == "README.md":
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(200_000)
        except OSError:
            return False
        return "# Wuerstchen prior LoRA" in text and "train_wuerstchen_prior_lora.py" in text
    return None  # the LoRA files and the PEFT folder: ours when the run they belong to is


def earlier_run(output_dir, logging_dir="logs"):
    """What --output_dir holds of an earlier run: (this trainer's entries, entries this trainer did
    not write but would overwrite or mix with its own), as names relative to the folder, sorted."""
    if not os.path.isdir(output_dir):
        return [], []
    names = sorted(os.listdir(output_dir))
    ours, foreign, undecided = [], [], []
    for name in names:
        path = os.path.join(output_dir, name)
        if CHECKPOINT_RE.match(name) and os.path.isdir(path):
            (ours if checkpoint_owner(path)[0] is True else foreign).append(name)
        elif name in RUN_FILES:
            verdict = _file_is_ours(output_dir, name)
            (undecided if verdict is None else ours if verdict else foreign).append(name)
    if not ours:
        return [], sorted(foreign + undecided, key=_order)
    extras = [n for n in RUN_EXTRAS if n in names]
    logs = os.path.normpath(logging_dir)
    if not os.path.isabs(logs) and not logs.startswith("..") and os.path.isdir(os.path.join(output_dir, logs)):
        extras.append(logs)
    extras += [n for n in names if n.startswith((".tmp-checkpoint-", ".tmp-old-checkpoint-", ".tmp-lora-"))]
    return sorted(ours + undecided + extras, key=_order), sorted(foreign, key=_order)


def _order(name):
    m = CHECKPOINT_RE.match(name)
    return (1, int(m.group(1)), "") if m else (0, 0, name)


def delete_earlier_run(output_dir, names):
    """--overwrite_output_dir: delete the earlier run's entries (earlier_run's first list, made when
    the run started), each named in a listing; anything else in the folder stays."""
    if not names:
        return
    print(f"--overwrite_output_dir: deleting the earlier run in {output_dir} ({len(names)} entries; the embeddings cache and other files stay):", flush=True)
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            print(f"  deleted {name}{os.sep}", flush=True)
        elif os.path.lexists(path):
            os.unlink(path)
            print(f"  deleted {name}", flush=True)


def sharded_engine(accelerator):
    """FSDP and DeepSpeed save and load the model state themselves; DDP and one process use our hooks."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gathered_lora_state(accelerator, model, prior):
    """The LoRA tensors under peft's names, complete on the main process.

    A collective under FSDP and DeepSpeed (they shard parameters): every process must call it.
    """
    from peft.utils import get_peft_model_state_dict

    full = accelerator.get_state_dict(model)
    return get_peft_model_state_dict(prior, state_dict=full) if full is not None else {}


EMA_SCALARS = {"decay": float, "min_decay": float, "optimization_step": int, "update_after_step": int,
               "use_ema_warmup": bool, "inv_gamma": (int, float), "power": (int, float)}


def save_ema_state(folder, ema, names):
    """The EMA (diffusers' EMAModel) as safetensors: the shadow weights under the trainable
    parameters' names, its counters in the header. Replaces accelerate's custom_checkpoint_0.pkl,
    which accelerate reads back with a full unpickler (code in the file would run)."""
    from wuerstchen_lora.models import atomic_save_tensors

    state = ema.state_dict()
    scalars = {k: state[k] for k in EMA_SCALARS}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in zip(names, state["shadow_params"])}
    atomic_save_tensors(tensors, os.path.join(folder, EMA_STATE_NAME), metadata={"ema": json.dumps({**scalars, "names": list(names)})})


def read_ema_state(path):
    """(state, None) with the EMA state of checkpoint `path` ({counters..., "names", "shadow_params"}),
    or (None, (file name, what is wrong)). The legacy pickle is read with weights_only=True only."""
    file = os.path.join(path, EMA_STATE_NAME)
    if os.path.isfile(file):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("ema") or "null")
                names = meta.get("names") if isinstance(meta, dict) else None
                if not isinstance(names, list) or sorted(names) != sorted(f.keys()):
                    return None, (EMA_STATE_NAME, "is damaged (its header does not describe its weights)")
                state = dict(meta, shadow_params=[f.get_tensor(n) for n in names])
        except Exception as e:  # a damaged header or file: safetensors raises its own types
            return None, (EMA_STATE_NAME, f"is damaged ({type(e).__name__})")
        name = EMA_STATE_NAME
    elif os.path.isfile(os.path.join(path, LEGACY_EMA_STATE_NAME)):
        name = LEGACY_EMA_STATE_NAME
        try:
            state = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError: the file holds more than weights (maybe code)
            return None, (name, f"cannot be read safely as weights ({type(e).__name__}); it is not loaded")
        if not isinstance(state, dict):
            return None, (name, "is damaged (not an EMA state)")
        state = dict(state, names=None)
    else:
        return None, (EMA_STATE_NAME, "is missing (the checkpoint was saved without --use_ema, or is incomplete)")
    shadow = state.get("shadow_params")
    if not isinstance(shadow, list) or not shadow or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in shadow):
        return None, (name, "is damaged (it holds no EMA weights)")
    for key, kind in EMA_SCALARS.items():
        value = state.get(key)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            return None, (name, f"is damaged (no valid {key})")
    if not 0 <= state["decay"] <= 1 or state["optimization_step"] < 0:
        return None, (name, "is damaged (decay or step out of range)")
    if not all(torch.isfinite(t).all() for t in shadow):
        return None, (name, "is damaged (NaN/inf in the EMA weights)")
    return state, None


def load_ema_state(path, ema, names):
    """Restore a checkpoint's EMA state into `ema` in place (device and dtype stay), checked
    against this run's trainable parameters; a damaged or mismatched state is a UserError."""
    state, problem = read_ema_state(path)
    if problem:
        raise UserError(f"checkpoint {path} cannot be resumed: {os.path.join(path, problem[0])} {problem[1]}; "
                        f"resume from an earlier checkpoint, or start without --resume_from_checkpoint")
    shadow = state["shadow_params"]
    if state["names"] is not None and list(state["names"]) != list(names) or len(shadow) != len(ema.shadow_params) \
            or any(a.shape != b.shape for a, b in zip(shadow, ema.shadow_params)):
        raise UserError(f"checkpoint {path}: its EMA state does not fit this adapter; resume with the checkpoint's --rank and --lora_target_modules")
    with torch.no_grad():
        for target, value in zip(ema.shadow_params, shadow):
            target.copy_(value)
    for key in EMA_SCALARS:
        setattr(ema, key, state[key])


def register_lora_checkpoint_hooks(accelerator, prior, lora_config, info, ema=None, param_names=None):
    """Checkpoints hold the LoRA file instead of the whole 4 GB prior, and resume into the SAME
    adapter; with --use_ema, the EMA state too (as safetensors: save_ema_state)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    def is_prior(model):
        return accelerator.unwrap_model(model) is prior

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if is_prior(models[i]):
                state = gathered_lora_state(accelerator, models[i], prior)
                if accelerator.is_main_process:
                    save_lora_file(output_dir, state, lora_config_dict(lora_config))
                    atomic_write_json(os.path.join(output_dir, TRAINING_INFO_NAME), info)
                if weights and not sharded_engine(accelerator):
                    weights.pop(i)  # accelerate would otherwise write the whole prior
        if ema is not None and accelerator.is_main_process:
            save_ema_state(output_dir, ema, param_names)

    def load_hook(models, input_dir):
        if ema is not None:
            load_ema_state(input_dir, ema, param_names)
        if sharded_engine(accelerator):
            return  # the engine restores its own (sharded) model state
        for i in reversed(range(len(models))):
            if is_prior(models[i]):
                models.pop(i)
                state = load_file(os.path.join(input_dir, LORA_WEIGHTS_NAME))
                state = {k[len("prior.") :]: v for k, v in state.items() if k.startswith("prior.")}
                result = set_peft_model_state_dict(prior, state)
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise UserError(f"{input_dir}: checkpoint LoRA does not fit this adapter (e.g. {unexpected[0]}); resume with the same --rank and --lora_target_modules")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, cfg, training_data, global_step, run_id=None):
    """accelerate state (LoRA via the hook, optimiser, LR schedule, grad scaler, RNG) into checkpoint-N,
    with trainer_state.json recording the configuration and data a resume depends on (guard.checkpoint_state).

    Written under a temporary name and renamed once complete, so `latest` never picks a half-written
    one; a failed write (a full disk) removes the temporary folder and leaves every earlier file.
    """
    from wuerstchen_lora.guard import checkpoint_state, disk_problem

    output_dir = cfg.output.output_dir
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{global_step}")
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(os.path.join(tmp, TRAINER_STATE_NAME), checkpoint_state(cfg, training_data, accelerator, global_step, run_id))
            replace_folder(tmp, final)
    except Exception as e:
        # torch.save says only "unexpected pos ..." on a full disk: look before the partial files go.
        problem = disk_problem(tmp) if accelerator.is_main_process and not isinstance(e, OSError) else None
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if problem:
            raise OSError(problem, os.strerror(problem), final) from e
        raise
    if accelerator.is_main_process and cfg.output.checkpoints_total_limit:
        prune_checkpoints(output_dir, cfg.output.checkpoints_total_limit, global_step, run_id)
    accelerator.wait_for_everyone()
    return final


def replace_folder(tmp, final):
    """Rename `tmp` onto `final`; an existing `final` is moved aside first and removed only after.
    A `final` this trainer did not write is never replaced (the up-front checks refuse such folders)."""
    old = None
    if os.path.isdir(final) and checkpoint_owner(final)[0] is False:
        raise UserError(f"{final} exists and was not written by this trainer; move it out of --output_dir and resume with --resume_from_checkpoint latest")
    if os.path.isdir(final):
        old = os.path.join(os.path.dirname(final), ".tmp-old-" + os.path.basename(final))
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(output_dir, limit, current_step, run_id):
    """Keep the newest `limit` checkpoints of this run (`run_id`, recorded in each trainer_state.json)
    up to `current_step`: the one just written is always among them, none newer than it is touched
    here, and neither is a folder another run or another tool wrote."""
    done = [(s, p) for s, p in own_checkpoints(output_dir, run_id) if s <= current_step]
    for _, old in done[:-limit]:
        shutil.rmtree(old)


def resume_checkpoint(run, cfg):
    """Load the checkpoint run_guard.plan_resume checked; returns the global step it was saved at.

    Settings that are safe to change take effect (a new learning rate, AdamW hyperparameters and
    EMA decay, which the restored optimiser and schedule state would otherwise override) and are
    reported in one line. With --discard_newer_checkpoints the newer checkpoints are deleted.
    """
    from wuerstchen_lora.guard import changed_settings, earlier_readable_checkpoint

    accelerator, plan = run.accelerator, run.resume_plan
    path, step = plan.path, plan.step
    if step > run.max_steps:
        raise UserError(f"{path} is at step {step}, past the {run.max_steps} steps this run is set to "
                        f"(--num_train_epochs {cfg.optim.num_train_epochs}); give --max_train_steps {step} or more")
    try:
        try:
            accelerator.load_state(path)
        except RuntimeError as e:
            # accelerate counts custom_checkpoint_*.pkl files against the objects registered with it
            # (none: the EMA state is ours to load, done by the hook) and refuses the difference,
            # after it has loaded everything else. Such a file (an earlier version's EMA state, read
            # by the hook with weights_only=True, or a planted one) is never unpickled here.
            if not str(e).startswith("Number of custom checkpoints"):
                raise
    except UserError:
        raise
    except Exception as e:  # damage the up-front checks cannot see
        earlier = earlier_readable_checkpoint(path, sharded_engine(accelerator))
        fix = (f"resume from {earlier} instead (--resume_from_checkpoint {earlier} --discard_newer_checkpoints)" if earlier
               else "start without --resume_from_checkpoint")
        raise UserError(f"{path} could not be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}); {fix}") from e
    apply_changed_hyperparameters(run, cfg.optim, plan.old_args)
    if plan.newer and accelerator.is_main_process:
        for newer in plan.newer:
            shutil.rmtree(newer, ignore_errors=True)
        accelerator.print(f"--discard_newer_checkpoints: deleted {', '.join(os.path.basename(p) for p in plan.newer)}")
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {path} at step {step}")
    changes = changed_settings(plan, cfg)
    if changes:
        accelerator.print(f"changed since {os.path.basename(os.path.normpath(path))} (safe to change): {'; '.join(changes)}")
    if step >= run.max_steps:
        accelerator.print(f"{path} is at the last step ({step}): nothing left to train; writing the final files")
    return step


def apply_changed_hyperparameters(run, optim, old):
    """Make changed optimiser settings count: load_state restores the optimiser's param groups and
    the schedule's base learning rates from the checkpoint, which would silently keep the old ones.
    `optim`: this run's OptimConfig; `old`: the checkpoint's configuration, {field: value}."""
    def changed(*keys):
        return any(k in old and old[k] != getattr(optim, k) for k in keys)

    groups = run.optimizer.param_groups
    if changed("learning_rate"):
        schedule = getattr(run.lr_scheduler, "scheduler", run.lr_scheduler)
        if hasattr(schedule, "lr_lambdas") and hasattr(schedule, "base_lrs"):
            schedule.base_lrs = [optim.learning_rate for _ in schedule.base_lrs]
            lrs = [base * fn(schedule.last_epoch) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
            schedule._last_lr = list(lrs)
        else:
            lrs = [optim.learning_rate] * len(groups)
        for group, lr in zip(groups, lrs):
            group["lr"], group["initial_lr"] = lr, optim.learning_rate
    updates = []
    if changed("adam_weight_decay"):
        updates.append(("weight_decay", optim.adam_weight_decay))
    if changed("adam_epsilon"):
        updates.append(("eps", optim.adam_epsilon))
    if changed("adam_beta1", "adam_beta2"):
        updates.append(("betas", (optim.adam_beta1, optim.adam_beta2)))
    for key, value in updates:
        for group in groups:
            current = group.get(key)
            if isinstance(current, float) and isinstance(value, float) or isinstance(current, tuple) and len(current) == len(value):
                group[key] = value
    if changed("ema_decay") and getattr(run, "ema", None) is not None:
        run.ema.decay = optim.ema_decay


def model_card(cfg, info, images_markdown="", widget=None):
    """The README.md of the output folder: huggingface_hub's card metadata (the YAML header the hub
    reads), then what was trained and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=cfg.model.pretrained_prior_model_name_or_path, library_name="diffusers", license="mit",
                         tags=["wuerstchen", "text-to-image", "diffusers", "diffusers-training", "lora"], inference=True,
                         **({"widget": widget} if widget else {}))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + model_card_body(cfg, info) + (f"\n{images_markdown}\n" if images_markdown else "")))


def model_card_body(cfg, info):
    model, lora, optim = cfg.model, cfg.lora, cfg.optim
    prompts = cfg.validation.validation_prompts or [cfg.subject.instance_prompt or "a photo"]
    trained_on = cfg.data.dataset or f"{cfg.subject.instance_data_dir} (subject: \"{cfg.subject.instance_prompt}\")"
    return f"""
# Wuerstchen prior LoRA

A LoRA adapter for the Wuerstchen v2 prior (Stage C) `{model.pretrained_prior_model_name_or_path}`, trained with
`train_wuerstchen_prior_lora.py` on `{trained_on}`.

| setting | value |
| --- | --- |
| rank / alpha | {lora.rank} / {lora.lora_alpha:g} |
| target modules | {", ".join(lora.lora_target_modules)} |
| training resolution | {cfg.data.resolution} px (generate at {info["output_size"]} px) |
| steps | {info["global_step"]} |
| batch (per process x processes x accumulation) | {optim.train_batch_size} x {info["num_processes"]} x {optim.gradient_accumulation_steps} |
| learning rate | {optim.learning_rate:g} ({optim.lr_scheduler}) |
| mixed precision | {optim.mixed_precision} |

## Use

```bash
python infer.py --checkpoint path/to/this/folder --prompt "{prompts[0]}"
```

or with diffusers alone. On diffusers 0.42 `WuerstchenPriorPipeline.from_pretrained` fails, so the
pipelines are assembled from their parts:

```python
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline, WuerstchenPriorPipeline
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior  # < 0.38: diffusers.pipelines.wuerstchen
from transformers import CLIPTextModel, CLIPTokenizer

def parts(repo, **models):
    loaded = {{name: cls.from_pretrained(repo, subfolder=name, torch_dtype=torch.float16) for name, cls in models.items()}}
    return dict(loaded, tokenizer=CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer"),
                scheduler=DDPMWuerstchenScheduler.from_pretrained(repo, subfolder="scheduler"))

prior = WuerstchenPriorPipeline(**parts("{model.pretrained_prior_model_name_or_path}", prior=WuerstchenPrior, text_encoder=CLIPTextModel)).to("cuda")
prior.load_lora_weights("path/to/this/folder")
decoder = WuerstchenDecoderPipeline(**parts("{model.pretrained_decoder_model_name_or_path}", decoder=WuerstchenDiffNeXt, vqgan=PaellaVQModel, text_encoder=CLIPTextModel)).to("cuda")
embeddings = prior("{prompts[0]}", height={info["output_size"]}, width={info["output_size"]}, guidance_scale=4.0).image_embeddings
image = decoder(embeddings, prompt="{prompts[0]}").images[0]
```
"""


def write_outputs(run, cfg, info):
    """The final LoRA file, training_info.json, args.json and the model card, written by the main
    process alone, after checking that every process holds the same LoRA weights."""
    from accelerate.utils import gather_object

    accelerator, output_dir = run.accelerator, cfg.output.output_dir
    state = gathered_lora_state(accelerator, run.prior, run.unwrapped)
    if accelerator.num_processes > 1 and not sharded_engine(accelerator):
        from peft.utils import get_peft_model_state_dict

        digests = gather_object([lora_digest(get_peft_model_state_dict(run.unwrapped))])
        if len(set(digests)) != 1:
            raise RuntimeError(f"LoRA weights differ between processes ({digests}); the distributed set-up is broken")
        accelerator.print(f"LoRA weights identical on all {accelerator.num_processes} processes (sha256 {digests[0][:16]})")
    if not accelerator.is_main_process:
        return
    path = save_lora_file(output_dir, state, lora_config_dict(run.lora_config))
    save_peft_adapter(os.path.join(output_dir, PEFT_ADAPTER_DIR), state, run.lora_config)
    if run.ema is not None:
        from peft.utils import get_peft_model_state_dict

        # Shadow weights under the trainable parameters' names, then peft's naming as for the raw file.
        shadow = dict(zip(run.param_names, run.ema.shadow_params))
        save_lora_file(output_dir, get_peft_model_state_dict(run.unwrapped, state_dict=shadow), lora_config_dict(run.lora_config), EMA_WEIGHTS_NAME)
    atomic_write_json(os.path.join(output_dir, TRAINING_INFO_NAME), info)
    atomic_write_json(os.path.join(output_dir, "args.json"), args_record(cfg, info))
    markdown, widget = card_images(output_dir, info, cfg.validation.validation_prompts)
    atomic_write_bytes(os.path.join(output_dir, "README.md"), model_card(cfg, info, markdown, widget).encode())
    # A plain print: only the process that really wrote the files says so.
    print(f"process {accelerator.process_index} wrote {path}", flush=True)


def args_record(cfg, info):
    """args.json: the whole configuration, and under "data_used" what the data's detection chose
    (the caption source, the image and caption columns), which the flags leave open."""
    record = cfg.to_dict()
    used = ((info or {}).get("data") or {}).get("data_used")
    if used:
        record["data_used"] = used
    return record


def card_images(output_dir, info, prompts):
    """The loss curve and the last validation images' grid for the model card (report.py): drawn
    after the LoRA and training_info.json are safely written, so a plotting failure costs a picture,
    never the run's files."""
    from wuerstchen_lora.report import write_card_images

    try:
        markdown, widget, notes = write_card_images(output_dir, info, prompts)
    except Exception as e:  # matplotlib or PIL trouble: the card goes without pictures
        print(f"warning: the model card's pictures could not be drawn ({type(e).__name__}: {str(e)[:150]})", file=sys.stderr)
        return "", None
    for line in notes:
        print(line, flush=True)
    return markdown, widget


def training_info(cfg, accelerator, lora_config, global_step, trainable, total):
    import diffusers
    import peft

    return {
        "base_model": cfg.model.pretrained_prior_model_name_or_path,
        "revision": cfg.model.revision,
        "decoder_model": cfg.model.pretrained_decoder_model_name_or_path,
        "resolution": cfg.data.resolution,
        "output_size": output_size_for_training_resolution(cfg.data.resolution),
        "lora": lora_config_dict(lora_config),
        "global_step": global_step,
        "num_processes": accelerator.num_processes,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }


def check_merged_prior_target(target, prior_model):
    """infer.py --save_merged_prior: outputs never overwrite inputs. Refused: the base prior's own
    folder (or anything inside it), and for a hub prior, the hub cache it is read from."""
    from wuerstchen_lora.flags import inside

    if os.path.isdir(prior_model):
        if inside(target, prior_model):
            raise UserError(f"--save_merged_prior {target} is inside the base prior {prior_model}: its weights would be overwritten by the merged ones; "
                            "give another folder")
        return
    from huggingface_hub.constants import HF_HUB_CACHE

    if inside(target, HF_HUB_CACHE):
        raise UserError(f"--save_merged_prior {target} is inside the hub cache {HF_HUB_CACHE}, where the base prior {prior_model} is read from; "
                        "give another folder")


def write_merged_prior(prior, folder):
    """prior.save_pretrained, then the files it wrote get the mode a plain open() gives (safetensors
    writes its files 0600, whatever the umask)."""
    from wuerstchen_lora.models import apply_umask

    prior.save_pretrained(folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and (name == "config.json" or name.startswith("diffusion_pytorch_model")):
            apply_umask(path)


HUB_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors", "README.md", "training_info.json", "loss_curve.png", "validation_grid.png",
             "args.json", "peft_adapter/adapter_config.json", "peft_adapter/adapter_model.safetensors")


def hub_upload_plan(output_dir):
    """What --push_to_hub uploads: the adapter files, the model card, the run's JSON and the
    validation images; never checkpoints, the embedding cache or logs."""
    files = [f for f in HUB_FILES if os.path.isfile(os.path.join(output_dir, f))]
    validation = os.path.join(output_dir, "validation")
    if os.path.isdir(validation):
        files += sorted(f"validation/{n}" for n in os.listdir(validation) if n.endswith(".png"))
    return files


LOGIN_COMMAND = "hf auth login"  # huggingface_hub 1.x and later ship `hf`; `huggingface-cli` is gone


def upload_command(repo_id, output_dir):
    """The `hf upload` command that sends what --push_to_hub would: the folder, less checkpoints, the
    embeddings cache, logs and every other file that stays local."""
    plan = set(hub_upload_plan(output_dir))
    excludes = []

    def leave_out(pattern):
        if pattern not in excludes:
            excludes.append(pattern)

    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            if name not in plan:
                leave_out(name)
            continue
        inner = sorted(os.listdir(path))
        if not any(f"{name}/{n}" in plan for n in inner):  # a folder that stays local as a whole
            leave_out("checkpoint-*" if re.fullmatch(r"checkpoint-\d+", name) else f"{name}/*")
            continue
        for n in inner:
            if f"{name}/{n}" not in plan:
                leave_out(f"{name}/{n}/*" if os.path.isdir(os.path.join(path, n)) else f"{name}/{n}")
    return " ".join([f"hf upload {repo_id} {output_dir}"] + [f"--exclude '{e}'" for e in excludes])


def check_hub_access(hub, accelerator):
    """--push_to_hub, at the start of the run (before anything is trained or deleted): the hub must
    be switched on and reachable, and a token with write access known (--hub_token, HF_TOKEN or the
    file `hf auth login` writes). One process asks; the others get its answer. Refused with one
    line naming the fix; else a note says who uploads where at the end."""
    if not hub.push_to_hub:
        return
    decided_on_main(accelerator, lambda: accelerator.print(hub_login_note(hub)))


def hub_login_note(hub):
    """The note for a good login, else a UserError (see check_hub_access)."""
    from huggingface_hub import HfApi, constants

    later = f"or leave --push_to_hub out and upload when training ends with `hf upload {hub.hub_model_id} OUTPUT_DIR`"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--push_to_hub: the hub is switched off here (HF_HUB_OFFLINE=1), so the upload at the end would fail; unset HF_HUB_OFFLINE, {later}")
    try:
        who = HfApi(token=hub.hub_token).whoami()
    except Exception as e:  # no token, a refused token, no network: each has its own remedy
        raise UserError(hub_login_problem(e, later)) from e
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError(f"--push_to_hub: the hub token of {who.get('name')} is read-only, so the upload at the end would fail; "
                        f"make a write token on https://huggingface.co/settings/tokens and run `{LOGIN_COMMAND}` (or set HF_TOKEN), {later}")
    name = who.get("name") or "?"
    repo = hub.hub_model_id if "/" in hub.hub_model_id else f"{name}/{hub.hub_model_id}"
    return (f"note: --push_to_hub: logged in to the hub as {name}; when training ends the LoRA, the model card and its pictures, "
            f"training_info.json and args.json go to https://huggingface.co/{repo} (not checkpoints, the embeddings cache or logs)")


def hub_login_problem(e, later):
    """The message for a failed whoami: not logged in, a token the hub refuses, or no hub."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(e, LocalTokenNotFoundError):
        return (f"--push_to_hub: not logged in to the hub, so the upload at the end would fail; run `{LOGIN_COMMAND}` "
                f"(or set HF_TOKEN, or give --hub_token), {later}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return (f"--push_to_hub: the hub refused the token ({first_text_line(e)}); run `{LOGIN_COMMAND} --force` with a valid write token "
                f"(or fix HF_TOKEN or --hub_token), {later}")
    return (f"--push_to_hub: the hub could not be reached ({type(e).__name__}: {first_text_line(e)}); check the connection "
            f"(and HF_ENDPOINT), {later}")


def first_text_line(e):
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:150]


def push_to_hub(hub, output_dir):
    """Upload the plan above to --hub_model_id (`hub`: HubConfig). The token is --hub_token, else
    what `hf auth login` or HF_TOKEN gives huggingface_hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    later = f"the files are in {output_dir}; upload them later with `{upload_command(hub.hub_model_id, output_dir)}`"
    if HF_HUB_OFFLINE:
        raise UserError(f"--push_to_hub: the hub is switched off here (HF_HUB_OFFLINE=1); {later}")
    files = hub_upload_plan(output_dir)
    try:
        api = HfApi(token=hub.hub_token)
        api.create_repo(hub.hub_model_id, exist_ok=True)
        api.upload_folder(repo_id=hub.hub_model_id, folder_path=output_dir, allow_patterns=files,
                          commit_message="Upload Wuerstchen prior LoRA")
    except Exception as e:  # network, authentication and permission errors all leave the same remedy
        raise UserError(f"--push_to_hub {hub.hub_model_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:150]}); {later}") from e
    print(f"uploaded {len(files)} files to https://huggingface.co/{hub.hub_model_id}: {', '.join(files)}")
