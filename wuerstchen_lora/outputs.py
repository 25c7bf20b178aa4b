"""What a training run writes: resumable checkpoints, the final LoRA file, the model card and
the JSON files that describe the run (infer.py reads `training_info.json`).

Every file is written under a temporary name and renamed into place; a checkpoint folder is
renamed into place once complete, so `latest` never picks a half-written one.
"""

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
    lora_config_dict,
    lora_digest,
    output_size_for_training_resolution,
    save_lora_file,
    save_peft_adapter,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
EMA_WEIGHTS_NAME = "pytorch_lora_weights_ema.safetensors"


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


def register_lora_checkpoint_hooks(accelerator, prior, lora_config, info):
    """Checkpoints hold the LoRA file instead of the whole 4 GB prior, and resume into the SAME adapter."""
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

    def load_hook(models, input_dir):
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


def save_checkpoint(accelerator, cfg, training_data, global_step):
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
            atomic_write_json(os.path.join(tmp, TRAINER_STATE_NAME), checkpoint_state(cfg, training_data, accelerator, global_step))
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
        prune_checkpoints(output_dir, cfg.output.checkpoints_total_limit, global_step)
    accelerator.wait_for_everyone()
    return final


def replace_folder(tmp, final):
    """Rename `tmp` onto `final`; an existing `final` is moved aside first and removed only after."""
    old = None
    if os.path.isdir(final):
        old = os.path.join(os.path.dirname(final), ".tmp-old-" + os.path.basename(final))
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(output_dir, limit, current_step):
    """Keep the newest `limit` checkpoints up to `current_step`: the one just written is always
    among them, and none newer than it is touched here."""
    done = [(s, p) for s, p in list_checkpoints(output_dir) if s <= current_step]
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
        accelerator.load_state(path)
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
    atomic_write_json(os.path.join(output_dir, "args.json"), cfg.to_dict())
    markdown, widget = card_images(output_dir, info, cfg.validation.validation_prompts)
    atomic_write_bytes(os.path.join(output_dir, "README.md"), model_card(cfg, info, markdown, widget).encode())
    # A plain print: only the process that really wrote the files says so.
    print(f"process {accelerator.process_index} wrote {path}", flush=True)


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


def push_to_hub(hub, output_dir):
    """Upload the plan above to --hub_model_id (`hub`: HubConfig). The token is --hub_token, else
    what `huggingface-cli login` or HF_TOKEN gives huggingface_hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    later = f"the files are in {output_dir}; upload them later with `huggingface-cli upload {hub.hub_model_id} {output_dir}`"
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
    print(f"uploaded {len(files)} files to https://huggingface.co/{hub.hub_model_id}")
