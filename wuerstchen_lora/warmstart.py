"""Warm starts (--init_lora): the trainer's new adapter starts from an existing prior LoRA's weights,
with the file's LoRA settings, a fresh optimiser and schedule (not a resume).

read_init_lora -> settings for the adapter and a state dict; check_init_lora_settings refuses flags
that contradict the file; load_init_lora fills the attached adapter and checks that all of it took.
"""

import json
import re

import torch

from wuerstchen_lora.hub import first_line, resolve_lora_spec
from wuerstchen_lora.models import UserError, read_lora_keys

FLAG = "--init_lora"
# Key prefixes of the layouts this reads: diffusers' pipeline file, PEFT's adapter_model.safetensors.
PREFIXES = ("prior.", "base_model.model.")
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<ab>lora_[AB])\.weight|lora_magnitude_vector(?:\.weight)?)$")
SETTING_FLAGS = {"r": "--rank", "lora_alpha": "--lora_alpha", "target_modules": "--lora_target_modules",
                 "use_dora": "--use_dora", "use_rslora": "--use_rslora"}


def read_init_lora(spec, revision=None):
    """(state_dict, settings) of the LoRA that `spec` names: a .safetensors file, a folder holding
    pytorch_lora_weights.safetensors, or a hub repo. The state dict's keys are peft's, without the
    `prior.` prefix; settings are r, lora_alpha, target_modules (sorted), use_dora, use_rslora."""
    path = resolve_lora_spec(spec, revision, flag=FLAG)
    if not path.endswith(".safetensors"):
        raise UserError(f"{FLAG} {path}: only .safetensors LoRA files are read (pickle files can run code)")
    read_lora_keys(path)  # a damaged or non-safetensors file: one line, not a traceback
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state_dict = strip_prefix(tensors, path)
    alphas = {k: v for k, v in state_dict.items() if k.endswith(".alpha")}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".alpha")}
    inferred = infer_settings(state_dict, alphas, path)
    stored = stored_settings(header, path)
    if stored is not None and stored["r"] != inferred["r"]:
        raise UserError(f"{FLAG} {path}: its header says rank {stored['r']} but its tensors have rank {inferred['r']}; "
                        "the file is inconsistent: save it again from the adapter")
    return state_dict, stored or inferred


def strip_prefix(tensors, path):
    """Keys without the pipeline's `prior.` (or PEFT's `base_model.model.`) prefix."""
    for prefix in PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items()}
    if any(k.startswith("prior.") for k in tensors):  # a mixed file (prior and text encoder, ...)
        other = sorted(k for k in tensors if not k.startswith("prior."))
        raise UserError(f"{FLAG} {path}: {len(other)} of {len(tensors)} tensors are not for the prior (e.g. {other[0]}); "
                        "give a Wuerstchen prior LoRA")
    return dict(tensors)  # no prefix: prior.save_lora_adapter()'s layout


def infer_settings(state_dict, alphas, path):
    """LoRA settings from the tensors alone (a file without this tool's header): rank from lora_A,
    targets from the module names, alpha = rank unless alphas are stored, DoRA from magnitudes."""
    modules, ranks = {}, {}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise UserError(f"{FLAG} {path}: tensor {key} is not a LoRA weight in diffusers/PEFT form "
                            "(lora_A/lora_B); kohya-style files (lora_down/lora_up) are not supported as --init_lora")
        modules.setdefault(m["module"], set()).add(m["ab"] or "magnitude")
        if m["ab"] == "lora_A":
            ranks[m["module"]] = value.shape[0]
    half = sorted(name for name, parts in modules.items() if not {"lora_A", "lora_B"} <= parts)
    if not modules or half:
        what = f"{half[0]} has lora_A or lora_B only" if half else "it holds no LoRA tensors"
        raise UserError(f"{FLAG} {path}: not a complete LoRA ({what}); give a LoRA trained for the Wuerstchen prior")
    if len(set(ranks.values())) > 1:
        raise UserError(f"{FLAG} {path}: its layers have different ranks ({', '.join(map(str, sorted(set(ranks.values()))))}); "
                        "files with per-layer ranks are not supported as --init_lora")
    rank = next(iter(ranks.values()))
    alpha_values = {float(v.float().reshape(-1)[0]) for v in alphas.values()}
    if len(alpha_values) > 1:
        raise UserError(f"{FLAG} {path}: its layers have different alphas; files with per-layer alphas are not supported as --init_lora")
    return {"r": rank, "lora_alpha": alpha_values.pop() if alpha_values else float(rank),
            "target_modules": sorted({module_suffix(name) for name in modules}),
            "use_dora": any("magnitude" in parts for parts in modules.values()), "use_rslora": False}


def module_suffix(name):
    """The target-module name as the trainer spells it: `blocks.2.attention.to_out.0` -> `to_out.0`,
    `blocks.1.mapper` -> `mapper` (the last name, with its index when it is a Sequential's child)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def stored_settings(header, path):
    """Settings from the LoRA config this tool (and diffusers' save_lora_weights) writes into the
    safetensors header under `lora_adapter_metadata`, keys prefixed like the tensors; None if absent."""
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in data)), "")
    config = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    if "r" not in config or not isinstance(config.get("target_modules"), list):
        return None  # another tool's header, or targets as a regex: fall back to the tensors
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{FLAG} {path}: its layers have different ranks or alphas (rank_pattern/alpha_pattern); "
                        "files with per-layer ranks are not supported as --init_lora")
    return {"r": int(config["r"]), "lora_alpha": float(config.get("lora_alpha") or config["r"]),
            "target_modules": sorted(config["target_modules"]),
            "use_dora": bool(config.get("use_dora")), "use_rslora": bool(config.get("use_rslora"))}


def check_init_lora_settings(settings, given):
    """Refuse flags given explicitly that contradict the file's settings. `given` maps setting names
    (r or rank, lora_alpha, target_modules, use_dora, use_rslora) to the user's values; None = not given."""
    clashes = []
    for name, value in given.items():
        key = "r" if name == "rank" else name
        if value is None or key not in SETTING_FLAGS:
            continue
        mine = settings[key]
        if key == "target_modules":
            same = sorted(set(value)) == sorted(set(mine))
        elif key == "lora_alpha":
            same = float(value) == float(mine)
        else:
            same = value == mine
        if not same:
            clashes.append(f"{SETTING_FLAGS[key]} {_show(value)} (the file has {_show(mine)})")
    if clashes:
        raise UserError(f"{FLAG}: the LoRA file's settings differ from the flags given: {'; '.join(clashes)}; "
                        "leave these flags out (a warm start takes them from the file) or give the file's values")


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple, set)):
        return ",".join(sorted(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_init_lora(prior, state_dict, source=FLAG):
    """Fill the adapter already attached to `prior` (recipe.add_lora) with `state_dict` and check that
    every LoRA parameter of the adapter got a value and no tensor was left over."""
    from peft.utils import set_peft_model_state_dict

    adapters = list(getattr(prior, "peft_config", {}))
    if len(adapters) != 1:
        raise ValueError(f"load_init_lora needs a prior with exactly one adapter attached, not {adapters}")
    name = adapters[0]
    bad = sorted(k for k, v in state_dict.items() if not torch.isfinite(v).all())
    if bad:
        raise UserError(f"{source}: {len(bad)} LoRA tensors hold NaN or inf (e.g. {bad[0]}); give a LoRA from a run that did not diverge")
    try:
        result = set_peft_model_state_dict(prior, state_dict, adapter_name=name)
    except RuntimeError as e:  # shapes that do not fit this prior
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
        raise UserError(f"{source}: the LoRA does not fit this prior ({detail[:200]}); it was trained for another model") from e
    unexpected = sorted(k for k in result.unexpected_keys if "lora_" in k)
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} of {len(state_dict)} LoRA tensors match no layer of this prior "
                        f"(e.g. {unexpected[0]}); the file was trained for another model")
    missing = sorted(k for k in result.missing_keys if "lora_" in k and f".{name}" in k)
    if missing:
        raise UserError(f"{source}: the file has no values for {len(missing)} LoRA tensors of the adapter (e.g. {missing[0]}); "
                        "it adapts only some of the layers its module names match, which --init_lora does not support")

