"""Subject (DreamBooth-style) training: instance images, class embeddings from the base prior, their cache."""

import contextlib
import os
import types

import pytest
import torch
from conftest import OneProcess, make_image_dataset
from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline
from PIL import Image

from wuerstchen_lora import objective, subject
from wuerstchen_lora.cache import CachedExamples, build_cache
from wuerstchen_lora.data import ImageTransform, load_training_dataset
from wuerstchen_lora.models import (
    EMBEDDING_SCALE,
    EMBEDDING_SHIFT,
    UserError,
    load_image_encoder,
    load_prior_components,
)

RES = 64  # 2x2 embedding grid: fast on the tiny prior
SIDE = RES // 32


@pytest.fixture(scope="module")
def models(tiny):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    image_encoder = load_image_encoder(tiny["image_encoder"])
    return types.SimpleNamespace(prior=prior, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                 image_encoder=image_encoder, encode_image=lambda px: objective.encode_images(image_encoder, px))


def generate(models, prompt="a photo of a dog", count=3, seed=0, batch_size=4, **kw):
    return subject.generate_class_embeddings(models.prior, models.text_encoder, models.tokenizer, models.scheduler, prompt, count,
                                             seed, SIDE, "cpu", torch.float32, batch_size=batch_size, **kw)


def prepare(tiny, models, root, *, with_models=True, **overrides):
    kw = dict(class_prompt="a photo of a dog", num_class_images=3, seed=0, resolution=RES, device="cpu", dtype=torch.float32,
              model_id=tiny["prior"], encode_image=models.encode_image, image_encoder_id=tiny["image_encoder"])
    kw.update(overrides)
    parts = (models.prior, models.text_encoder, models.tokenizer, models.scheduler) if with_models else (None,) * 4
    return subject.prepare_class_examples(str(root), *parts, **kw)


def fake_generator(calls):
    """Stands in for the prior: records the requested count, returns seeded random embeddings."""

    def fake(prior, text_encoder, tokenizer, scheduler, prompt, count, seed, side, device, dtype, **kw):
        calls.append(count)
        return torch.randn(count, 16, side, side, generator=torch.Generator().manual_seed(seed))

    return fake


def refuse(*a, **kw):
    raise AssertionError("the prior ran although the class examples were cached")


# ----------------------------------------------------------------------------------------------
# Instance images


def test_instance_dataset_captions_every_image_with_the_prompt(tmp_path):
    folder = make_image_dataset(tmp_path / "dog", "txt_captions", n=3)  # its .txt captions must be ignored
    dataset, image_column, caption_column = subject.instance_dataset(folder, "a photo of sks dog")
    assert (image_column, caption_column) == ("image", "text") and len(dataset) == 3
    assert dataset["text"] == ["a photo of sks dog"] * 3
    assert dataset[0]["image"].size == (96, 80)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "caption.txt").write_text("a caption without an image")
    for bad_folder, prompt, message in ((tmp_path / "nope", "p", "no such folder"), (tmp_path / "empty", "p", "no images"),
                                        (folder, "  ", "--instance_prompt")):
        with pytest.raises(UserError, match=message):
            subject.instance_dataset(str(bad_folder), prompt)


# ----------------------------------------------------------------------------------------------
# Generated class embeddings


def test_generated_embeddings_have_the_training_shape_and_follow_the_seed(models):
    first = generate(models, count=3, seed=7, steps=6)  # the cache test runs the default 29 steps
    assert first.shape == (3, 16, SIDE, SIDE) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, generate(models, count=3, seed=7, steps=6))
    assert not torch.allclose(first, generate(models, count=3, seed=8, steps=6))
    # One generator per example: the batch size does not change what example k is.
    torch.testing.assert_close(first, generate(models, count=3, seed=7, steps=6, batch_size=2), rtol=1e-5, atol=1e-5)
    assert not models.prior.training  # left as it was (from_pretrained gives eval mode)


def test_pipeline_height_gives_the_training_grid_exactly():
    for side in range(1, 200):
        h = subject.pipeline_height_for_side(side, 42.67)
        assert -(-h // 42.67) == side
    assert subject.pipeline_height_for_side(24, 42.67) == 1024  # 768 px training = 1024 px output


def test_pipeline_output_maps_back_exactly_into_the_space_of_encoded_images(tiny, models, monkeypatch):
    """Let the pipeline return known latents (the prior's space: encoded images) untouched by denoising:
    its output is then raw EfficientNet features, and the mapping gives back the encoded images."""
    dataset, _, _ = load_training_dataset(tiny["dataset"])
    pixels = torch.stack([ImageTransform(RES, center_crop=True)(dataset[i]["image"]) for i in range(2)])
    known = objective.encode_images(models.image_encoder, pixels)
    raw_effnet = models.image_encoder(pixels)
    monkeypatch.setattr(WuerstchenPriorPipeline, "prepare_latents", lambda self, shape, *a: known.clone())
    monkeypatch.setattr(DDPMWuerstchenScheduler, "step", lambda self, model_output, timestep, sample, **kw: types.SimpleNamespace(prev_sample=sample))
    outputs = []
    mapping = subject.pipeline_to_training_space
    monkeypatch.setattr(subject, "pipeline_to_training_space", lambda out, pipe: outputs.append(out) or mapping(out, pipe))
    got = generate(models, count=2, batch_size=2)
    assert len(outputs) == 1
    torch.testing.assert_close(outputs[0], raw_effnet, rtol=1e-5, atol=1e-5)  # the pipeline returns effnet(x)
    torch.testing.assert_close(got, known, rtol=1e-6, atol=1e-6)  # mapped back: (effnet(x) + 1) / 42
    pipe = WuerstchenPriorPipeline(tokenizer=None, text_encoder=None, prior=None, scheduler=None)
    assert (pipe.config.latent_mean, pipe.config.latent_std) == (EMBEDDING_SCALE, EMBEDDING_SHIFT)


def test_generation_refuses_a_prior_with_the_lora_attached(tiny):
    from peft import LoraConfig

    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    prior.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(RuntimeError, match="base prior"):
        subject.generate_class_embeddings(prior, text_encoder, tokenizer, scheduler, "a dog", 1, 0, SIDE, "cpu", torch.float32)


# ----------------------------------------------------------------------------------------------
# Cache


def test_class_examples_are_cached_and_rebuilt_when_the_key_changes(tiny, models, tmp_path, monkeypatch):
    entered = []

    class Main(OneProcess):
        @contextlib.contextmanager
        def main_process_first(self):
            entered.append(True)
            yield

    built = prepare(tiny, models, tmp_path, accelerator=Main())
    assert entered and not built.reused and (built.real, built.generated) == (0, 3)
    assert built.image_embeddings.shape == (3, 16, SIDE, SIDE)
    torch.testing.assert_close(built.image_embeddings, generate(models, count=3, seed=0))
    text = objective.encode_text(models.text_encoder, models.tokenizer, ["a photo of a dog"], "cpu")[0]
    torch.testing.assert_close(built.text_embeddings, text)

    monkeypatch.setattr(subject, "generate_class_embeddings", refuse)
    again = prepare(tiny, models, tmp_path, with_models=False)  # no prior, no text encoder: read from the cache
    assert again.reused and again.folder == built.folder
    assert torch.equal(again.image_embeddings, built.image_embeddings) and torch.equal(again.text_embeddings, built.text_embeddings)

    calls = []
    monkeypatch.setattr(subject, "generate_class_embeddings", fake_generator(calls))
    folders = {built.folder}
    for change in ({"class_prompt": "a photo of a cat"}, {"num_class_images": 4}, {"seed": 1}, {"steps": 5},
                   {"guidance_scale": 2.0}, {"resolution": 2 * RES}):
        rebuilt = prepare(tiny, models, tmp_path, **change)
        assert not rebuilt.reused, change
        folders.add(rebuilt.folder)
    assert calls == [3, 4, 3, 3, 3, 3] and len(folders) == 7


def test_real_class_images_come_first_and_only_the_rest_is_generated(tiny, models, tmp_path, monkeypatch):
    class_dir = make_image_dataset(tmp_path / "dogs", "txt_captions", n=3)
    (tmp_path / "dogs" / "aaa_broken.png").write_bytes(b"not an image")  # sorted first; skipped
    calls = []
    monkeypatch.setattr(subject, "generate_class_embeddings", fake_generator(calls))
    mixed = prepare(tiny, models, tmp_path / "cache", num_class_images=5, class_data_dir=class_dir)
    assert (mixed.real, mixed.generated, calls) == (3, 2, [2])
    # The same images, cropped and encoded as the cache does for training images.
    pixels = torch.stack([ImageTransform(RES, center_crop=True)(Image.open(os.path.join(class_dir, f"img_{i:03d}.png"))) for i in range(3)])
    torch.testing.assert_close(mixed.image_embeddings[:3], models.encode_image(pixels), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed.image_embeddings[3:], fake_generator([])(*[None] * 5, 2, 0, SIDE, None, None))

    only_real = prepare(tiny, models, tmp_path / "cache", num_class_images=2, class_data_dir=class_dir)
    assert (only_real.real, only_real.generated, calls) == (2, 0, [2])
    torch.testing.assert_close(only_real.image_embeddings, mixed.image_embeddings[:2])

    monkeypatch.setattr(subject, "generate_class_embeddings", refuse)
    assert prepare(tiny, models, tmp_path / "cache", num_class_images=5, class_data_dir=class_dir, with_models=False).reused
    first = os.path.join(class_dir, "img_000.png")
    os.utime(first, ns=(os.stat(first).st_atime_ns, os.stat(first).st_mtime_ns + 10**9))  # an edited class image
    with pytest.raises(AssertionError, match="cached"):
        prepare(tiny, models, tmp_path / "cache", num_class_images=5, class_data_dir=class_dir)


def test_prepare_refuses_missing_settings(tiny, models, tmp_path):
    with pytest.raises(UserError, match="--class_prompt"):
        prepare(tiny, models, tmp_path, class_prompt="")
    with pytest.raises(UserError, match="--num_class_images"):
        prepare(tiny, models, tmp_path, num_class_images=0)


# ----------------------------------------------------------------------------------------------
# Training samples


def test_class_examples_look_like_cached_instance_samples_and_draw_deterministically(tiny, models, tmp_path):
    args = types.SimpleNamespace(resolution=RES, center_crop=True, random_flip=False, cache_batch_size=4, dataloader_num_workers=0)
    dataset, image_column, caption_column = load_training_dataset(tiny["dataset"])
    encode_text = lambda captions: objective.encode_text(models.text_encoder, models.tokenizer, captions, "cpu")  # noqa: E731
    # `args` stands in for both the DataConfig and the CacheConfig that build_cache reads.
    build_cache(str(tmp_path / "c"), dataset, (image_column, caption_column), args, args, models.encode_image, encode_text, accelerator=OneProcess())
    instance = CachedExamples(str(tmp_path / "c"), RES, random_flip=False, seed=0)[0]

    examples = subject.ClassExamples(prepare(tiny, models, tmp_path / "class"), seed=0)
    assert len(examples) == 3
    sample = examples[1]
    assert sample.keys() == instance.keys()
    for key in instance:
        assert (sample[key].shape, sample[key].dtype) == (instance[key].shape, instance[key].dtype), key

    def draw(seed, epoch, index):
        ex = subject.ClassExamples(examples_set, seed=seed)
        ex.set_epoch(epoch)
        return ex[index]["noise"], ex[index]["timestep"]

    examples_set = types.SimpleNamespace(image_embeddings=examples.image_embeddings, text_embeddings=examples.text_embeddings)
    base = draw(0, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(base, draw(0, 0, 1)))
    for other in (draw(1, 0, 1), draw(0, 1, 1), draw(0, 0, 2)):
        assert not torch.equal(base[0], other[0]) and not torch.equal(base[1], other[1])
    # A stream of its own: not the noise instance sample 1 gets with the same seed and epoch.
    assert not torch.equal(base[0], CachedExamples(str(tmp_path / "c"), RES, random_flip=False, seed=0)[1]["noise"])
