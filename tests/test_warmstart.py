"""Warm-start reading (--init_lora): settings from the file's header or its tensors, a clear refusal of
clashing flags and of files that do not fit, and loading equal to diffusers' own load_lora_weights."""

import shutil

import pytest
import torch
from conftest import prior_output, run_script, train_args
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wuerstchen_lora.models import (
    DEFAULT_LORA_TARGETS,
    LORA_WEIGHTS_NAME,
    UserError,
    build_prior_pipeline,
    load_lora_checked,
    load_prior_components,
)
from wuerstchen_lora.warmstart import (
    check_init_lora_settings,
    load_init_lora,
    module_suffix,
    read_init_lora,
)

ATTN = sorted(DEFAULT_LORA_TARGETS)
ATTN_MLP = sorted(DEFAULT_LORA_TARGETS + ("channelwise.0", "channelwise.4"))
TRAINED = {"r": 4, "lora_alpha": 8.0, "target_modules": ATTN, "use_dora": False, "use_rslora": False}
VARIANT = {"r": 2, "lora_alpha": 6.0, "target_modules": ATTN_MLP, "use_dora": True, "use_rslora": True}


@pytest.fixture(scope="module")
def variant(tiny, tmp_path_factory):
    """DoRA + rsLoRA on attention and MLP layers, alpha != rank: every setting differs from the default."""
    out = tmp_path_factory.mktemp("variant") / "out"
    run_script(train_args(tiny, out, steps=2, extra=["--use_dora", "--use_rslora", "--lora_targets", "attn-mlp", "--rank", "2",
                                                    "--lora_alpha", "6", "--learning_rate", "5e-2"]), launcher="inprocess")
    return out


def runs(trained, variant):
    return {"trained": (trained, TRAINED), "variant": (variant, VARIANT)}


def strip_header(src, dst):
    """The same tensors without the LoRA config in the header: a file from another diffusers-format tool."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src / LORA_WEIGHTS_NAME)), str(dst))
    with safe_open(str(dst), framework="pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    return dst


def fresh_prior(tiny, settings):
    prior = load_prior_components(tiny["prior"])[0]
    prior.add_adapter(LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
                                 use_dora=settings["use_dora"], use_rslora=settings["use_rslora"], init_lora_weights="gaussian"))
    return prior


@pytest.mark.parametrize("which", ["trained", "variant"])
def test_settings_come_back_from_the_header(trained, variant, which):
    out, expected = runs(trained, variant)[which]
    for spec in (out, out / LORA_WEIGHTS_NAME, str(out)):  # folder, file, plain string
        state_dict, settings = read_init_lora(spec)
        assert settings == expected
    file_tensors = load_file(str(out / LORA_WEIGHTS_NAME))
    assert sorted(state_dict) == sorted(k[len("prior."):] for k in file_tensors)
    assert all(torch.equal(v, file_tensors["prior." + k]) for k, v in state_dict.items())


def test_checkpoint_folder_reads_too(trained):
    _, settings = read_init_lora(trained / "checkpoint-15")
    assert settings == TRAINED


@pytest.mark.parametrize("which", ["trained", "variant"])
def test_settings_are_inferred_without_the_header(trained, variant, which, tmp_path):
    out, expected = runs(trained, variant)[which]
    bare = strip_header(out, tmp_path / "bare.safetensors")
    state_dict, settings = read_init_lora(bare)
    # rank, targets and DoRA are in the tensors; alpha falls back to the rank (as diffusers assumes),
    # rsLoRA cannot be seen
    assert settings == dict(expected, lora_alpha=float(expected["r"]), use_rslora=False)
    assert sorted(state_dict) == sorted(read_init_lora(out)[0])


def test_per_module_alphas_are_read_and_mixed_ranks_refused(trained, tmp_path):
    tensors = load_file(str(trained / LORA_WEIGHTS_NAME))
    modules = {k.split(".lora_")[0] for k in tensors}
    with_alpha = dict(tensors, **{f"{m}.alpha": torch.tensor(8.0) for m in modules})
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))
    state_dict, settings = read_init_lora(tmp_path / "alpha.safetensors")
    assert settings == TRAINED and not any(k.endswith(".alpha") for k in state_dict)
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    mixed = dict(tensors, **{key: torch.zeros(2, tensors[key].shape[1]), key.replace("lora_A", "lora_B"): torch.zeros(tensors[key].shape[1], 2)})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError, match="different ranks.*not supported as --init_lora"):
        read_init_lora(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("which", ["trained", "variant"])
@pytest.mark.parametrize("header", [True, False])
def test_warm_started_prior_equals_diffusers_loading(tiny, trained, variant, which, header, tmp_path):
    out, _ = runs(trained, variant)[which]
    lora_file = out / LORA_WEIGHTS_NAME if header else strip_header(out, tmp_path / LORA_WEIGHTS_NAME)
    state_dict, settings = read_init_lora(lora_file)
    prior = fresh_prior(tiny, settings)
    load_init_lora(prior, state_dict)
    pipe = build_prior_pipeline(*load_prior_components(tiny["prior"]))
    load_lora_checked(pipe, str(lora_file))
    warm, reference = prior_output(prior), prior_output(pipe.prior)
    assert torch.allclose(warm, reference, rtol=0, atol=1e-6), (warm - reference).abs().max()
    base = prior_output(load_prior_components(tiny["prior"])[0])
    assert (warm - base).abs().max() > 1e-3, "the LoRA had no effect: the comparison would prove nothing"


def test_clashing_flags_are_named_in_one_line(trained):
    _, settings = read_init_lora(trained)
    check_init_lora_settings(settings, {"rank": 4, "lora_alpha": 8, "target_modules": list(reversed(ATTN)), "use_dora": False})
    check_init_lora_settings(settings, {"rank": None, "lora_alpha": None})  # not given: nothing to compare
    with pytest.raises(UserError) as e:
        check_init_lora_settings(settings, {"rank": 16, "lora_alpha": 8.0, "target_modules": ATTN_MLP, "use_dora": True})
    message = str(e.value)
    assert "\n" not in message
    assert "--rank 16 (the file has 4)" in message and "--use_dora on (the file has off)" in message
    assert "--lora_target_modules channelwise.0,channelwise.4,to_k" in message
    assert "--lora_alpha" not in message and "leave these flags out" in message


def test_a_lora_for_other_layers_is_refused(tiny, trained, tmp_path):
    tensors = load_file(str(trained / LORA_WEIGHTS_NAME))
    moved = {k.replace("blocks.2.", "blocks.99."): v for k, v in tensors.items()}
    save_file(moved, str(tmp_path / "moved.safetensors"))
    state_dict, settings = read_init_lora(tmp_path / "moved.safetensors")
    with pytest.raises(UserError, match="match no layer of this prior"):
        load_init_lora(fresh_prior(tiny, settings), state_dict)


def test_a_lora_of_other_widths_is_refused(tiny, tmp_path):
    keys = [f"prior.blocks.{b}.attention.{t}.lora_{ab}.weight" for b in (2, 5) for t in ATTN for ab in "AB"]
    save_file({k: torch.zeros(4, 64) if "lora_A" in k else torch.zeros(64, 4) for k in keys}, str(tmp_path / "wide.safetensors"))
    state_dict, settings = read_init_lora(tmp_path / "wide.safetensors")
    assert settings["target_modules"] == ATTN
    with pytest.raises(UserError, match="does not fit this prior"):
        load_init_lora(fresh_prior(tiny, settings), state_dict)


def test_a_lora_of_only_some_layers_is_refused(tiny, trained, tmp_path):
    tensors = load_file(str(trained / LORA_WEIGHTS_NAME))
    save_file({k: v for k, v in tensors.items() if "blocks.2." in k}, str(tmp_path / "part.safetensors"))
    state_dict, settings = read_init_lora(tmp_path / "part.safetensors")
    with pytest.raises(UserError, match="no values for .* LoRA tensors of the adapter"):
        load_init_lora(fresh_prior(tiny, settings), state_dict)


def test_nan_weights_are_refused(tiny, trained, tmp_path):
    state_dict, settings = read_init_lora(trained)
    state_dict[next(iter(state_dict))][0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or inf"):
        load_init_lora(fresh_prior(tiny, settings), state_dict)


@pytest.mark.parametrize("name, tensors, message", [
    ("kohya.safetensors", {"lora_unet_blocks_2_attention_to_q.lora_down.weight": torch.zeros(4, 32)}, "kohya-style"),
    ("half.safetensors", {"prior.blocks.2.attention.to_q.lora_A.weight": torch.zeros(4, 32)}, "lora_A or lora_B only"),
    ("mixed.safetensors", {"prior.blocks.2.attention.to_q.lora_A.weight": torch.zeros(4, 32),
                           "text_encoder.x.lora_A.weight": torch.zeros(4, 32)}, "not for the prior"),
])
def test_files_that_are_no_prior_lora_are_refused(tmp_path, name, tensors, message):
    save_file(tensors, str(tmp_path / name))
    with pytest.raises(UserError, match=message):
        read_init_lora(tmp_path / name)


def test_missing_and_unsafe_paths_are_refused(trained, tmp_path):
    with pytest.raises(UserError, match="--init_lora .*: no such file or folder"):
        read_init_lora(tmp_path / "nothing")
    with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors in this folder"):
        read_init_lora(tmp_path)
    pickle = tmp_path / "lora.bin"
    shutil.copy(trained / LORA_WEIGHTS_NAME, pickle)
    with pytest.raises(UserError, match="only .safetensors"):
        read_init_lora(pickle)


@pytest.mark.parametrize("name, suffix", [
    ("blocks.2.attention.to_out.0", "to_out.0"), ("blocks.2.attention.to_q", "to_q"), ("blocks.1.mapper", "mapper"),
    ("blocks.2.kv_mapper.1", "kv_mapper.1"), ("cond_mapper.0", "cond_mapper.0"), ("blocks.0.channelwise.4", "channelwise.4"),
])
def test_module_names_map_to_the_trainers_target_names(name, suffix):
    assert module_suffix(name) == suffix
