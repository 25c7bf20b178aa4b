"""Embedding cache, attention and memory options."""

import json
import os

import pytest
import torch
from conftest import OneProcess, make_image_dataset, run_script, train_args

from wuerstchen_lora import flags, objective
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.cache import (
    MANIFEST,
    CachedExamples,
    build_cache,
    cache_key,
    image_for_cache,
)
from wuerstchen_lora.config import with_changes
from wuerstchen_lora.data import ImageTransform, load_training_dataset
from wuerstchen_lora.models import load_image_encoder, load_prior_components


def cache_args(tiny, **overrides):
    args = flags.parse_args(["--dataset", tiny["dataset"], "--pretrained_prior_model_name_or_path", tiny["prior"],
                               "--image_encoder", tiny["image_encoder"], "--resolution", "64"])
    return with_changes(args, **overrides)


@pytest.fixture(scope="module")
def encoders(tiny):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    image_encoder = load_image_encoder(tiny["image_encoder"])
    return (lambda pixels: objective.encode_images(image_encoder, pixels),
            lambda captions: objective.encode_text(text_encoder, tokenizer, captions, "cpu"))


def build(tiny, encoders, folder, args):
    dataset, image_column, caption_column = load_training_dataset(args.data.dataset)
    build_cache(str(folder), dataset, (image_column, caption_column), args.data, args.cache, *encoders, accelerator=OneProcess())
    return dataset


def test_cached_embeddings_equal_encoding_on_the_fly(tiny, encoders, tmp_path):
    args = cache_args(tiny, center_crop=True, random_flip=True)
    dataset = build(tiny, encoders, tmp_path / "c", args)
    encode_image, encode_text = encoders
    cached = CachedExamples(str(tmp_path / "c"), 64, random_flip=True, seed=0)
    seen = set()
    for i in range(len(dataset)):
        row = dataset[i]
        sample = cached[i]
        assert image_for_cache(row["image"], 64, True).size == (64, 64)
        pixels = ImageTransform(64, center_crop=True)(row["image"], None)[None]
        straight, flipped = encode_image(pixels)[0], encode_image(torch.flip(pixels, dims=[-1]))[0]
        got = sample["image_embeddings"]
        matches = [name for name, ref in (("straight", straight), ("flipped", flipped)) if torch.allclose(got, ref, rtol=1e-4, atol=1e-4)]
        assert len(matches) == 1, f"sample {i} matches neither orientation"
        seen.add(matches[0])
        torch.testing.assert_close(sample["text_embeddings"], encode_text([row["text"]])[0], rtol=1e-5, atol=1e-5)
    assert seen == {"straight", "flipped"}
    assert cached.empty_text().shape == encode_text([""])[0].shape


def test_random_crop_mode_stores_whole_images_and_crops_windows(tiny, encoders, tmp_path):
    wide = make_image_dataset(tmp_path / "wide", "imagefolder_jsonl", n=2, size=(200, 64))
    args = cache_args(tiny, dataset=wide, center_crop=False, random_flip=False)
    build(tiny, encoders, tmp_path / "c", args)
    cached = CachedExamples(str(tmp_path / "c"), 64, random_flip=False, seed=0)
    full = cached._file("images-000.safetensors").get_tensor("0")
    assert full.shape[-2:] == (2, 6)  # 200x64 px: trimmed to 192x64, encoded whole
    windows = set()
    for epoch in range(6):
        cached.set_epoch(epoch)
        sample = cached[0]["image_embeddings"]
        assert sample.shape[-2:] == (2, 2)
        windows.add(next(left for left in range(full.shape[-1] - 1) if torch.equal(full[:, :, left:left + 2], sample)))
    assert len(windows) > 1, "the crop window never moved"


def test_batched_cache_build_matches_one_at_a_time(tiny, encoders, tmp_path):
    """Images of several sizes (random-crop mode keeps each whole) and flips, decoded by a worker and
    encoded 3 at a time, give the same cache as one image per call."""
    from safetensors.torch import load_file

    mixed = make_image_dataset(tmp_path / "mixed", "imagefolder_jsonl", n=7, mixed_modes=True)
    encode_image, encode_text = encoders
    calls = []

    def counting(pixels):
        calls.append(tuple(pixels.shape))
        return encode_image(pixels)

    built = {}
    for name, batch, workers in (("single", 1, 0), ("batched", 3, 1)):
        args = cache_args(tiny, dataset=mixed, center_crop=False, random_flip=True, cache_batch_size=batch, dataloader_num_workers=workers)
        dataset, image_column, caption_column = load_training_dataset(args.data.dataset)
        calls.clear()
        build_cache(str(tmp_path / name), dataset, (image_column, caption_column), args.data, args.cache, counting, encode_text, accelerator=OneProcess())
        built[name] = (load_file(str(tmp_path / name / "images-000.safetensors")), load_file(str(tmp_path / name / "texts-000.safetensors")), list(calls))
    (single_images, single_texts, single_calls), (images, texts, batched_calls) = built["single"], built["batched"]
    assert len(dataset) == 7 and len(single_calls) == 7  # straight + flipped of one image per call
    assert all(shape[0] == 2 for shape in single_calls)
    assert max(shape[0] for shape in batched_calls) > 2 and len(batched_calls) < 7
    assert len({tuple(t.shape[-2:]) for t in images.values()}) > 1
    assert images.keys() == single_images.keys() and len(images) == 14
    for key in images:
        torch.testing.assert_close(images[key], single_images[key], rtol=1e-4, atol=1e-5)
    assert texts.keys() == single_texts.keys()
    for key in texts:
        torch.testing.assert_close(texts[key], single_texts[key], rtol=1e-5, atol=1e-6)


def key(cfg, dataset, dtype, image_encoder):
    return cache_key(cfg.model, cfg.data, dataset, ("image", "text"), dtype, image_encoder)


def test_cache_key_follows_every_setting(tiny):
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=tiny["dataset"], split="train")
    base = key(cache_args(tiny), dataset, torch.float32, tiny["image_encoder"])
    assert base == key(cache_args(tiny), dataset, torch.float32, tiny["image_encoder"])
    changed = [
        key(cache_args(tiny, resolution=96), dataset, torch.float32, tiny["image_encoder"]),
        key(cache_args(tiny, random_flip=True), dataset, torch.float32, tiny["image_encoder"]),
        key(cache_args(tiny, center_crop=True), dataset, torch.float32, tiny["image_encoder"]),
        key(cache_args(tiny), dataset, torch.bfloat16, tiny["image_encoder"]),
        key(cache_args(tiny), dataset.select(range(3)), torch.float32, tiny["image_encoder"]),
    ]
    assert len(set(changed + [base])) == len(changed) + 1
    caption = os.path.join(tiny["dataset"], "metadata.jsonl")
    stat = os.stat(caption)
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited dataset file
    assert key(cache_args(tiny), dataset, torch.float32, tiny["image_encoder"]) != base
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_half_written_cache_is_rebuilt(tiny, encoders, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "images-000.safetensors").write_bytes(b"garbage from a crashed run")
    args = cache_args(tiny, center_crop=True, random_flip=False)
    build(tiny, encoders, folder, args)
    assert json.loads((folder / MANIFEST).read_text())["rows"] == 8
    assert CachedExamples(str(folder), 64, False, 0)[0]["image_embeddings"].shape == (16, 2, 2)


def test_script_reuses_cache_and_rebuilds_on_change(tiny, tmp_path):
    shared = tmp_path / "cache"
    extra = ["--embeddings_cache_dir", shared, "--center_crop"]
    first = run_script(train_args(tiny, tmp_path / "a", extra=extra), launcher="inprocess")
    assert "reusing" not in first.stdout
    second = run_script(train_args(tiny, tmp_path / "b", extra=extra), launcher="inprocess")
    assert "reusing embedding cache" in second.stdout
    run_script(train_args(tiny, tmp_path / "c", extra=extra + ["--random_flip"]), launcher="inprocess")
    assert len([p for p in shared.iterdir() if (p / MANIFEST).is_file()]) == 2


def test_cached_and_uncached_training_agree(tiny, tmp_path):
    """Centre crops, no flip: the cache holds exactly what on-the-fly encoding computes."""
    from safetensors.torch import load_file

    extra = ["--center_crop", "--learning_rate", "1e-3", "--max_train_steps", "3"]
    run_script(train_args(tiny, tmp_path / "cached", extra=extra), launcher="inprocess")
    run_script(train_args(tiny, tmp_path / "uncached", extra=extra + ["--no_cache_embeddings"]), launcher="inprocess")
    a = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "uncached" / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def fixed_grads(prior, scheduler, params):
    g = torch.Generator().manual_seed(0)
    emb, text = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 77, prior.config.c_cond, generator=g)
    noise, t = torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g)
    objective.compute_loss(prior, scheduler, emb, text, noise, t).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    args = cache_args(tiny)
    prior, _, _, scheduler, _ = trainer.load_frozen_models(args.model, "cpu", torch.float32)
    _, params, _ = trainer.add_lora(prior, args.lora)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # lora_B starts at zero; give every LoRA weight a gradient path
    prior.eval()  # dropout off, so both passes see the same network
    plain = fixed_grads(prior, scheduler, params)
    prior.enable_gradient_checkpointing()
    checkpointed = fixed_grads(prior, scheduler, params)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_8bit_adam_without_bitsandbytes_says_how_to_fix(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    for given in (["--use_8bit_adam"], ["--optimizer", "adamw8bit"]):
        with pytest.raises(trainer.UserError, match="pip install bitsandbytes"):
            flags.parse_args(["--dataset", tiny["dataset"], *given])
    args = cache_args(tiny)
    assert isinstance(trainer.make_optimizer(args.optim, [torch.nn.Parameter(torch.zeros(2))], "cpu"), torch.optim.AdamW)


def test_accelerate_config_compile_becomes_block_compile(tiny, tmp_path, monkeypatch):
    """An accelerate config with dynamo_backend: never accelerate's whole-model compile (its
    `_orig_mod.` keys break the LoRA file), the trainer's block-by-block compile instead."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    args = cache_args(tiny, output_dir=str(tmp_path), report_to="none")
    assert (args.optim.torch_compile, args.optim.torch_compile_backend) == ("default", "aot_eager")
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process runs may have set it up
    try:
        accelerator = trainer.make_accelerator(args)
        assert accelerator.state.dynamo_plugin.backend.value.lower() == "no"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
