"""infer.py misuse and edge cases (DoRA at scale 0, long prompts, output types, sizes), and validation
during training that must not hang or fail late (sharded priors, a bad validation decoder)."""

import shutil
import types

import pytest
import torch
from conftest import prior_output, run_script, train_args
from PIL import Image

from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import (
    LORA_WEIGHTS_NAME,
    WuerstchenPrior,
    image_formats,
    load_prior_components,
    use_sdpa_attention,
)
from wuerstchen_lora.validation import (
    make_held_out_loss,
    make_validator,
    prior_sharding,
)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def dora(tiny, tmp_path_factory):
    """A DoRA adapter trained a few steps at a high learning rate: its magnitudes differ from the base norms."""
    out = tmp_path_factory.mktemp("dora") / "out"
    run_script(train_args(tiny, out, steps=3, extra=["--use_dora", "--rank", "4", "--learning_rate", "5e-2"]), launcher="inprocess")
    return out


def infer_prior(dora, *extra):
    """The prior exactly as infer.py sets it up (LoRA loaded, checked, then scaled, fused or removed)."""
    args = infer.parse_args(["--checkpoint", str(dora), "--prompt", "x", "--device", "cpu", *extra])
    return infer.load_prior_pipeline(args, infer.resolve_lora_path(args.checkpoint)).prior


def test_dora_at_scale_zero_is_the_base_prior(tiny, dora, tmp_path, capsys):
    base_prior = load_prior_components(tiny["prior"])[0]
    base_plain = prior_output(base_prior)  # the attention processor a saved prior loads with
    use_sdpa_attention(base_prior)
    base = prior_output(base_prior)  # infer.py's (same numbers up to rounding)
    assert (prior_output(infer_prior(dora)) - base).abs().max() > 0.01, "the DoRA adapter had no effect"
    capsys.readouterr()
    assert torch.equal(prior_output(infer_prior(dora, "--lora_scale", "0")), base)
    assert torch.equal(prior_output(infer_prior(dora, "--lora_scale", "0", "--fuse_lora")), base)
    notes = capsys.readouterr().err
    assert notes.count("note: --lora_scale 0: the LoRA file was checked but is not applied") == 2
    merged = tmp_path / "merged"
    assert infer.main(["--checkpoint", str(dora), "--save_merged_prior", str(merged), "--lora_scale", "0"]) == 0
    assert torch.equal(prior_output(WuerstchenPrior.from_pretrained(str(merged))), base_plain)
    # between 0 and 1 the learned magnitudes apply in full: said in a note; fused and unfused agree
    half = prior_output(infer_prior(dora, "--lora_scale", "0.5"))
    assert "note: DoRA adapter: --lora_scale 0.5 scales the learned direction change only" in capsys.readouterr().err
    torch.testing.assert_close(prior_output(infer_prior(dora, "--lora_scale", "0.5", "--fuse_lora")), half, rtol=1e-4, atol=1e-4)


def test_long_prompt_gets_a_note_and_jpeg_output_is_jpeg(tiny, dora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" + "a very long prompt about a red circle " * 12 + "\n")
    out = tmp_path / "img.jpeg"
    assert infer.main(["--checkpoint", str(dora), "--prompt_file", str(prompts), "--height", "128", "--width", "128",
                       "--decoder_steps", "2", "--device", "cpu", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    paths = [tmp_path / "img-0.jpeg", tmp_path / "img-1.jpeg"]
    assert captured.out.split() == [str(p) for p in paths]
    for p in paths:
        assert Image.open(p).format == "JPEG"
    notes = [line for line in captured.err.splitlines() if "CLIP" in line]
    assert len(notes) == 1 and notes[0].startswith("note: prompt 2 (") and "truncated to the first 77" in notes[0]


def test_note_for_long_prompts_names_them(tiny):
    tokenizer = load_prior_components(tiny["prior"])[2]
    assert infer.note_long_prompts(tokenizer, ["short"], "also short") == 0
    assert infer.note_long_prompts(tokenizer, ["word " * 80], "word " * 90) == 2


@pytest.mark.parametrize("name", ["x.gif", "x.bmp", "x.tiff"])
def test_unknown_output_type_is_refused(dora, tmp_path, capsys, name):
    out = tmp_path / name
    out.write_bytes(b"earlier file")
    assert infer.main(["--checkpoint", str(dora), "--prompt", "x", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert name in line and ".png" in line and ".jpg" in line and "Traceback" not in err
    if ".webp" in image_formats():
        assert ".webp" in line
    assert out.read_bytes() == b"earlier file"


def test_output_without_extension_is_png_and_folder_is_refused(dora, tmp_path, capsys):
    assert infer.output_file(str(tmp_path / "image")) == str(tmp_path / "image.png")
    assert infer.output_file(str(tmp_path / "a.JPG")) == infer.check_output_type(str(tmp_path / "a.JPG")) == str(tmp_path / "a.JPG")
    for folder in (str(tmp_path), str(tmp_path / "new") + "/"):
        assert infer.main(["--checkpoint", str(dora), "--prompt", "x", "--output", folder]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"error: --output {folder} is a folder; give an image path such as")


@pytest.mark.parametrize("flag, value", [("--height", "0"), ("--width", "-128")])
def test_non_positive_size_is_a_clear_error(dora, tmp_path, capsys, flag, value):
    out = tmp_path / "x.png"
    assert infer.main(["--checkpoint", str(dora), "--prompt", "x", flag, value, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: {flag} {value}: the image size must be positive; give a multiple of 128 such as 1024"]
    assert "note:" not in err and "Traceback" not in err and not out.exists()


class FakeAccelerator:
    """What the validation set-up reads of an accelerator, for distributed types this CPU cannot run."""

    def __init__(self, distributed_type, zero_stage=None):
        self.distributed_type = distributed_type
        self.state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage) if zero_stage else None)
        self.is_main_process, self.num_processes = True, 2
        self.printed = []

    def print(self, *a):
        self.printed.append(" ".join(map(str, a)))


def test_validation_is_off_for_a_sharded_prior():
    from accelerate.utils import DistributedType

    assert prior_sharding(FakeAccelerator(DistributedType.FSDP)) == "FSDP"
    assert prior_sharding(FakeAccelerator(DistributedType.DEEPSPEED, zero_stage=3)) == "DeepSpeed ZeRO-3"
    assert prior_sharding(FakeAccelerator(DistributedType.DEEPSPEED, zero_stage=2)) is None
    assert prior_sharding(FakeAccelerator(DistributedType.MULTI_GPU)) is None
    assert prior_sharding(FakeAccelerator(DistributedType.NO)) is None

    fsdp = FakeAccelerator(DistributedType.FSDP)
    # nothing is encoded or loaded (the decoder path does not exist): a note each, and no validation
    cfg = types.SimpleNamespace(validation=types.SimpleNamespace(validation_prompts=["a cat"]),
                                model=types.SimpleNamespace(pretrained_decoder_model_name_or_path="/nonexistent"))
    assert make_validator(cfg, fsdp, None, None, None, torch.float32) is None
    assert make_held_out_loss(types.SimpleNamespace(held_out=object()), cfg, fsdp, None) is None
    assert len(fsdp.printed) == 2 and all(line.startswith("note: ") and "under FSDP" in line for line in fsdp.printed)
    assert make_held_out_loss(types.SimpleNamespace(held_out=None), cfg, FakeAccelerator(DistributedType.NO), None) is None


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_bad_validation_decoder_stops_before_training(tiny, tmp_path, how):
    out = tmp_path / "out"
    decoder = tmp_path / "decoder"
    if how == "broken":  # a folder laid out like the repo, with a truncated weights file
        shutil.copytree(tiny["decoder"], decoder)
        weights = next((decoder / "vqgan").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    proc = run_script(train_args(tiny, out, steps=2, extra=["--validation_prompts", "a cat", "--validation_steps", "1",
                                                            "--pretrained_decoder_model_name_or_path", decoder]),
                      launcher="inprocess", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert str(decoder) in line and "--pretrained_decoder_model_name_or_path" in line and "Traceback" not in proc.stderr
    assert ("no such folder" if how == "missing" else "could not load the decoder") in line
    assert not (out / "args.json").exists() and not (out / LORA_WEIGHTS_NAME).exists()
    assert not list(out.glob("checkpoint-*")) and not (out / "validation").exists()
