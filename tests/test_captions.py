"""Caption handling: prefix, dropout, tag shuffling with fixed leading tags, repeats."""

import torch
from conftest import OneProcess, make_image_dataset, run_script, train_args

from wuerstchen_lora import flags, objective
from wuerstchen_lora.cache import CachedExamples, build_cache
from wuerstchen_lora.data import CaptionOptions, load_training_dataset, sample_plan
from wuerstchen_lora.models import load_image_encoder, load_prior_components


def test_shuffle_keeps_the_first_tags_and_adds_the_prefix():
    opts = CaptionOptions(prefix="sks, ", shuffle_tags=True, keep_tokens=2)
    caption = "1girl, solo, red hair, smile, outdoors, hat"
    seen = set()
    for seed in range(30):
        out = opts.apply(caption, tag_seed=seed)
        assert out.startswith("sks, 1girl, solo, ")
        assert sorted(out[len("sks, "):].split(", ")) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    assert CaptionOptions(prefix="sks, ").apply("a, b, c", tag_seed=0) == "sks, a, b, c"


def test_caption_dropout_rate():
    drops = sum(sample_plan(0, 0, i, dropout=0.25).drop_caption for i in range(4000))
    assert 900 < drops < 1100
    assert not any(sample_plan(0, 0, i).drop_caption for i in range(100))


def test_non_utf8_caption_count_is_per_load(tmp_path):
    """Counted per load, not in a module-level list: the same folder loaded three times in one
    process reports 1 each time, and another load (a held-out set) does not add to it."""
    folder = tmp_path / "data"
    make_image_dataset(folder, "txt_captions", n=3)
    (folder / "img_001.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    for _ in range(3):
        stats = {}
        dataset, _, caption_column = load_training_dataset(str(folder), stats=stats)
        assert stats["non_utf8_caption_files"] == 1
        assert "caf\xe9 au lait" in dataset[caption_column]
    clean = make_image_dataset(tmp_path / "clean", "txt_captions", n=2)
    load_training_dataset(str(folder))  # no stats: counted nowhere
    stats = {}
    load_training_dataset(clean, stats=stats)
    assert stats["non_utf8_caption_files"] == 0


def test_cached_dropout_shuffle_and_repeats(tiny, tmp_path):
    prior, text_encoder, tokenizer, _ = load_prior_components(tiny["prior"])
    image_encoder = load_image_encoder(tiny["image_encoder"])
    args = flags.parse_args(["--dataset", tiny["dataset"], "--resolution", "64", "--center_crop", "--caption_prefix", "sks, "])
    dataset, image_column, caption_column = load_training_dataset(args.data.dataset)
    encode_text = lambda captions: objective.encode_text(text_encoder, tokenizer, captions, "cpu")  # noqa: E731
    opts = CaptionOptions(prefix="sks, ", dropout=0.5)
    build_cache(str(tmp_path / "c"), dataset, (image_column, caption_column), args.data, args.cache,
                lambda px: objective.encode_images(image_encoder, px), encode_text, OneProcess(), captions=opts)

    cached = CachedExamples(str(tmp_path / "c"), 64, False, 0, opts, repeats=2)
    assert len(cached) == 16
    empty = encode_text([""])[0]
    prefixed = encode_text(["sks, " + dataset[0][caption_column]])[0]
    kinds = set()
    for index in (0, 8):  # the same image, twice per epoch
        for epoch in range(6):
            cached.set_epoch(epoch)
            text = cached[index]["text_embeddings"]
            kinds.add("empty" if torch.allclose(text, empty, atol=1e-5) else "prefixed" if torch.allclose(text, prefixed, atol=1e-5) else "other")
    assert kinds == {"empty", "prefixed"}
    cached.set_epoch(0)
    assert not torch.equal(cached[0]["noise"], cached[8]["noise"])  # a repeat is a different draw

    shuffled = CachedExamples(str(tmp_path / "c"), 64, False, 0, CaptionOptions(prefix="sks, ", shuffle_tags=True, keep_tokens=1),
                              raw_captions=["first, b, c, d, e"] * len(dataset))
    drawn = set()
    for epoch in range(8):
        shuffled.set_epoch(epoch)
        caption = shuffled[0]["caption"]
        assert caption.startswith("sks, first, ")
        drawn.add(caption)
    assert len(drawn) > 2


def test_script_with_every_caption_option(tiny, dataset_factory, tmp_path):
    out = tmp_path / "out"
    proc = run_script(train_args(tiny, out, steps=3, extra=["--shuffle_tags", "--keep_tokens", "1", "--caption_prefix", "sks, ",
                                                            "--caption_dropout", "0.3", "--repeats", "2"]), launcher="inprocess")
    assert "16 samples" in proc.stdout
