"""The training script end to end, run as users run it (`accelerate launch`) on tiny models."""

import json

import pytest
import torch
from conftest import prior_output, run_script, train_args
from safetensors import safe_open
from safetensors.torch import load_file

from wuerstchen_lora import flags, objective
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import (
    LORA_WEIGHTS_NAME,
    load_image_encoder,
    load_prior_components,
)
from wuerstchen_lora.outputs import EMA_WEIGHTS_NAME

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def check_lora_file(path, rank):
    state = load_file(path)
    assert state, "empty LoRA file"
    for key, tensor in state.items():
        assert key.startswith("prior.blocks.") and ".attention." in key, key
        assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert any(f".{t}.lora_" in key for t in ATTENTION_TARGETS), key
        assert rank in tensor.shape
    # two attention blocks in the tiny prior, four projections each, A and B
    assert len(state) == 2 * 4 * 2
    with safe_open(path, framework="pt") as f:
        assert "lora_adapter_metadata" in (f.metadata() or {})


@pytest.mark.parametrize("kind", ["imagefolder_jsonl", "imagefolder_csv", "txt_captions", "jsonl", "csv", "parquet"])
def test_trains_on_each_dataset_kind(tiny, dataset_factory, tmp_path, kind):
    dataset = dataset_factory(kind, n=4)
    out = tmp_path / "out"
    run_script(train_args(tiny, out, dataset=dataset, extra=["--rank", "2"]), launcher="accelerate")
    check_lora_file(out / LORA_WEIGHTS_NAME, rank=2)
    args = json.loads((out / "args.json").read_text())
    assert args["data"]["dataset"] == dataset and args["lora"]["rank"] == 2
    info = json.loads((out / "training_info.json").read_text())
    assert info["global_step"] == 2 and info["base_model"] == tiny["prior"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and f"base_model: {tiny['prior']}" in card and "- lora" in card


def test_any_image_mode_and_list_captions(tiny, tmp_path):
    import datasets

    from tools.make_tiny_models import make_image_dataset

    folder = make_image_dataset(tmp_path / "mixed", "imagefolder_jsonl", n=7, mixed_modes=True)
    rows = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    modes = {row["image"].mode for row in rows}
    assert {"RGBA", "P", "L", "CMYK"} <= modes and any(m.startswith("I") for m in modes), modes
    # the same images, with captions given as lists (one picked per sample and epoch)
    records = [{"image": f"{folder}/{name}", "caption": [f"caption {i}", f"other {i}"]}
               for i, name in enumerate(sorted(p for p in __import__("os").listdir(folder) if p.startswith("img_")))]
    data = tmp_path / "lists.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    run_script(train_args(tiny, out, dataset=str(data), steps=4, extra=["--train_batch_size", "2"]), launcher="inprocess")
    check_lora_file(out / LORA_WEIGHTS_NAME, rank=8)


def test_outputs_of_a_full_run(trained):
    check_lora_file(trained / LORA_WEIGHTS_NAME, rank=4)
    for step in (15, 30):
        ckpt = trained / f"checkpoint-{step}"
        assert (ckpt / LORA_WEIGHTS_NAME).is_file() and (ckpt / "trainer_state.json").is_file()
        assert (ckpt / "optimizer.bin").is_file()
        # no copy of the whole prior in a checkpoint: only the LoRA file and accelerate's state
        assert not list(ckpt.glob("model*.safetensors")) and not list(ckpt.glob("pytorch_model*"))
    validation = sorted(p.name for p in (trained / "validation").iterdir())
    assert validation == ["step-000015-0.png", "step-000015-1.png", "step-000030-0.png", "step-000030-1.png"]
    assert list((trained / "logs").rglob("events.out.tfevents*")), "no tensorboard events written"
    info = json.loads((trained / "training_info.json").read_text())
    assert info["lora"]["r"] == 4 and info["lora"]["lora_alpha"] == 8
    assert info["output_size"] == 128 and info["trainable_parameters"] == 2 * 4 * (4 * 32 + 32 * 4)


def test_saved_file_loads_in_plain_diffusers_with_alpha(trained, tiny):
    """The file loads through diffusers' own load_lora_weights and gives the output of W + alpha/r * B A."""
    from diffusers import WuerstchenPriorPipeline

    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)
    base = prior_output(prior)
    pipe.load_lora_weights(str(trained), weight_name=LORA_WEIGHTS_NAME)  # older diffusers need the name offline
    with_lora = prior_output(prior)

    # Independent reference: merge the file's matrices by hand with scale alpha / r = 8 / 4.
    reference, *_ = load_prior_components(tiny["prior"])
    state = load_file(trained / LORA_WEIGHTS_NAME)
    modules = dict(reference.named_modules())
    for key in state:
        if key.endswith("lora_A.weight"):
            name = key[len("prior."):-len(".lora_A.weight")]
            delta = state[key.replace("lora_A", "lora_B")] @ state[key]
            modules[name].weight.data += 2.0 * delta
    expected = prior_output(reference)
    assert not torch.allclose(base, with_lora, atol=1e-5), "the LoRA changed nothing"
    torch.testing.assert_close(with_lora, expected, rtol=1e-4, atol=1e-5)


def test_only_lora_weights_change(tiny):
    """A few real optimiser steps through the script's own functions: base weights stay bit-identical."""
    args = flags.parse_args(["--dataset", tiny["dataset"], "--pretrained_prior_model_name_or_path", tiny["prior"],
                               "--image_encoder", tiny["image_encoder"], "--rank", "4", "--learning_rate", "1e-2"])
    prior, text_encoder, tokenizer, scheduler, image_encoder = trainer.load_frozen_models(args.model, "cpu", torch.float32)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    _, params, _ = trainer.add_lora(prior, args.lora)
    opt = torch.optim.AdamW(params, lr=args.optim.learning_rate)
    pixels = torch.randn(2, 3, 64, 64)
    emb = objective.encode_images(image_encoder, pixels)
    text = objective.encode_text(text_encoder, tokenizer, ["a", "b"], "cpu")
    for _ in range(3):
        objective.compute_loss(prior, scheduler, emb, text).backward()
        opt.step()
        opt.zero_grad()
    after = prior.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(after[k].dtype == torch.float32 for k in lora_keys)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora_keys if "lora_B" in k)
    for key, value in before.items():
        base_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[base_key], value), f"base weight {key} changed"


def fixed_loss(prior, scheduler, image_embeddings, text_embeddings):
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(4):  # the same noise and timesteps every time this is called
        noise = torch.randn(image_embeddings.shape, generator=g)
        t = torch.rand(image_embeddings.shape[0], generator=g)
        with torch.no_grad():
            losses.append(objective.compute_loss(prior.eval(), scheduler, image_embeddings, text_embeddings, noise, t).item())
    return sum(losses) / len(losses)


def test_training_lowers_loss_on_fixed_noise(trained, tiny):
    """The trained LoRA gives a clearly lower loss than the base prior on the training images."""
    from diffusers import WuerstchenPriorPipeline
    from torch.utils.data import default_collate

    from wuerstchen_lora.data import (
        CaptionedImages,
        ImageTransform,
        load_training_dataset,
    )

    dataset, image_column, caption_column = load_training_dataset(tiny["dataset"])
    examples = CaptionedImages(dataset, image_column, caption_column, ImageTransform(128, center_crop=True), seed=0)
    batch = default_collate([examples[i] for i in range(len(examples))])
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    image_encoder = load_image_encoder(tiny["image_encoder"])
    emb = objective.encode_images(image_encoder, batch["pixel_values"])
    text = objective.encode_text(text_encoder, tokenizer, batch["caption"], "cpu")
    base = fixed_loss(prior, scheduler, emb, text)
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)
    pipe.load_lora_weights(str(trained), weight_name=LORA_WEIGHTS_NAME)
    tuned = fixed_loss(prior, scheduler, emb, text)
    assert tuned < 0.85 * base, (base, tuned)


def test_resume_continues_exactly(tiny, tmp_path):
    """Interrupted at a checkpoint and resumed == uninterrupted, with warmup, cosine LR, accumulation,
    flips, random crops, dropout, EMA and an epoch boundary in the middle."""
    extra = ["--train_batch_size", "3", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
             "--random_flip", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3",
             "--use_ema", "--ema_decay", "0.9"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script(train_args(tiny, full, steps=7, extra=extra), launcher="inprocess")
    # the interrupted run: everything up to checkpoint-3, as a killed run would have left it
    resumed.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    proc = run_script(train_args(tiny, resumed, steps=7, extra=extra + ["--resume_from_checkpoint", "latest"]), launcher="inprocess")
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = load_file(full / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    at_checkpoint = load_file(full / "checkpoint-3" / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], at_checkpoint[k]) for k in a), "training after the checkpoint changed nothing"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    ema_a, ema_b = load_file(full / EMA_WEIGHTS_NAME), load_file(resumed / EMA_WEIGHTS_NAME)  # the EMA resumes too
    for k in ema_a:
        torch.testing.assert_close(ema_b[k], ema_a[k], rtol=0, atol=1e-6)


def test_sdpa_attention_matches_classic(tiny):
    from wuerstchen_lora.models import use_sdpa_attention

    prior, *_ = load_prior_components(tiny["prior"])
    classic = prior_output(prior)
    use_sdpa_attention(prior)
    torch.testing.assert_close(prior_output(prior), classic, rtol=1e-5, atol=1e-5)


def test_mixed_precision_falls_back_to_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flags.resolve_mixed_precision("fp16")[0] == "no"
    assert "fp32" in flags.resolve_mixed_precision("bf16")[1]
    assert flags.resolve_mixed_precision(None) == ("no", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert flags.resolve_mixed_precision(None) == ("fp16", None)
    assert flags.resolve_mixed_precision("bf16") == ("bf16", None)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert flags.resolve_mixed_precision(None) == ("bf16", None)
    # `accelerate launch --mixed_precision no` (or its default without a config): respected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    mode, notice = flags.resolve_mixed_precision(None)
    assert mode == "no" and "fp32" in notice
    assert flags.resolve_mixed_precision("fp16") == ("fp16", None)  # the script's own flag still wins
