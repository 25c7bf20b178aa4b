"""Aspect-ratio buckets: bucket set, assignment, batches from one bucket, cache and validation sizes."""

import json

import pytest
from conftest import run_script, train_args
from PIL import Image

from wuerstchen_lora.data import (
    BucketBatchSampler,
    assign_bucket,
    make_buckets,
    upscale_needed,
)


def test_buckets_are_on_the_32px_lattice_with_about_the_same_area():
    buckets = make_buckets(768)
    assert (768, 768) in buckets and (1024, 576) in buckets and (576, 1024) in buckets
    for w, h in buckets:
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 768 * 768
        if max(w / h, h / w) <= 2:
            assert w * h >= 0.9 * 768 * 768
        assert max(w / h, h / w) <= 4


def test_assignment_takes_the_nearest_aspect_ratio():
    buckets = make_buckets(768)
    assert assign_bucket((1920, 1080), buckets) == (1024, 576)
    assert assign_bucket((1080, 1920), buckets) == (576, 1024)
    assert assign_bucket((500, 500), buckets) == (768, 768)
    assert upscale_needed((500, 500), (768, 768)) == pytest.approx(1.536)


def test_batches_come_from_one_bucket_and_cover_every_image():
    row_buckets = [(64, 64)] * 5 + [(96, 32)] * 3 + [(32, 128)] * 2
    sampler = BucketBatchSampler(row_buckets, batch_size=2, seed=0, repeats=1)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 1
        for batch in batches:
            assert len(batch) == 2 and len({row_buckets[i] for i in batch}) == 1
        assert {i for b in batches for i in b} == set(range(10))
        orders.append(batches)
        sampler.set_epoch(epoch)
        assert list(sampler) == batches  # fixed by (seed, epoch)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("cache", ["--cache_embeddings", "--no_cache_embeddings"])
def test_script_trains_on_buckets_and_validates_at_a_matching_size(tiny, tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    sizes = [(256, 144)] * 4 + [(144, 256)] * 3 + [(160, 160)] * 2 + [(40, 40)]  # the last needs 3.2x: left out
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 90, 160)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    run_script(train_args(tiny, out, dataset=data, steps=4, extra=[
        cache, "--aspect_ratio_buckets", "--resolution", "128", "--random_flip",
        "--validation_prompts", "a picture", "--validation_steps", "4"]), launcher="inprocess")
    info = json.loads((out / "training_info.json").read_text())
    assert info["data"]["buckets"] == {"160x96": 4, "96x160": 3, "128x128": 2}
    assert info["data"]["too_small_for_bucket"] == 1
    # most images are 160x96: validation renders at about 4/3 of that, on the 128 px grid
    assert Image.open(out / "validation" / "step-000004-0.png").size == (256, 128)
