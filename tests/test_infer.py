"""infer.py end to end on the LoRA that the shared training run wrote."""

import numpy as np
import pytest
import torch
from conftest import INFER, run_script
from PIL import Image
from safetensors.torch import save_file

from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import (
    DEFAULT_STAGE_C_TIMESTEPS,
    build_prior_pipeline,
    generate_images,
    load_decoder_pipeline,
    load_prior_components,
    use_sdpa_attention,
)

PROMPT = "a red circle"


def infer_images(trained, tmp_path, name, *extra, checkpoint=None):
    out = tmp_path / f"{name}.png"
    assert infer.main(["--checkpoint", str(checkpoint or trained), "--prompt", PROMPT, "--height", "128",
                       "--width", "128", "--device", "cpu", "--output", str(out), *extra]) == 0
    return np.asarray(Image.open(out))


def base_model_image(tiny):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    use_sdpa_attention(prior)
    pipe = build_prior_pipeline(prior, text_encoder, tokenizer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    decoder = load_decoder_pipeline(tiny["decoder"])
    image = generate_images(pipe, decoder, [PROMPT], height=128, width=128, generator=torch.Generator().manual_seed(0))[0]
    return np.asarray(image)


def test_writes_numbered_images_of_the_requested_size(trained, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert infer.main(["--checkpoint", str(trained), "--prompt", PROMPT, "--height", "256", "--width", "128",
                       "--num_images", "2", "--device", "cpu", "--output", str(out)]) == 0
    paths = [tmp_path / "many-0.png", tmp_path / "many-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for p in paths:
        assert Image.open(p).size == (128, 256)


def prior_embeddings(prior_pipeline):
    return prior_pipeline(PROMPT, height=128, width=128, timesteps=DEFAULT_STAGE_C_TIMESTEPS, guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(0), output_type="pt").image_embeddings


def infer_prior_pipeline(trained, *extra):
    """The prior pipeline exactly as infer.py sets it up (LoRA loaded, checked, scaled or fused)."""
    args = infer.parse_args(["--checkpoint", str(trained), "--prompt", PROMPT, "--device", "cpu", *extra])
    return infer.load_pipelines(args, infer.resolve_lora_path(args.checkpoint))[0]


def test_lora_scale_zero_is_the_base_model_and_one_is_not(trained, tiny, tmp_path):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    use_sdpa_attention(prior)
    base = prior_embeddings(build_prior_pipeline(prior, text_encoder, tokenizer, scheduler))
    assert torch.equal(prior_embeddings(infer_prior_pipeline(trained, "--lora_scale", "0")), base)
    tuned = prior_embeddings(infer_prior_pipeline(trained))
    assert (tuned - base).abs().mean() > 0.01 * base.abs().mean(), "the LoRA had no effect on the prior"
    # and through the whole of infer.py, down to the PNG
    base_image = base_model_image(tiny)
    assert np.array_equal(infer_images(trained, tmp_path, "zero", "--lora_scale", "0"), base_image)
    assert not np.array_equal(infer_images(trained, tmp_path, "one"), base_image), "the LoRA had no visible effect"


@pytest.mark.parametrize("scale", ["1.0", "0.5"])
def test_fused_lora_gives_the_same_output(trained, tmp_path, scale):
    unfused = prior_embeddings(infer_prior_pipeline(trained, "--lora_scale", scale))
    fused = prior_embeddings(infer_prior_pipeline(trained, "--lora_scale", scale, "--fuse_lora"))
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    if scale == "1.0":
        unfused_image = infer_images(trained, tmp_path, "unfused").astype(int)
        fused_image = infer_images(trained, tmp_path, "fused", "--fuse_lora").astype(int)
        assert np.abs(fused_image - unfused_image).max() <= 2  # float rounding, in 8-bit pixels


def test_checkpoint_folder_and_bare_file(trained, tmp_path):
    from_folder = infer_images(trained, tmp_path, "ckpt", checkpoint=trained / "checkpoint-15")
    from_file = infer_images(trained, tmp_path, "file", checkpoint=trained / "checkpoint-15" / "pytorch_lora_weights.safetensors")
    assert np.array_equal(from_folder, from_file)


@pytest.mark.parametrize("keys, message", [
    (["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"], "not a Wuerstchen prior LoRA"),
    (["prior.blocks.99.attention.to_q.lora_A.weight", "prior.blocks.99.attention.to_q.lora_B.weight"], "does not fit this prior"),
    (["prior.blocks.2.attention.to_q.lora_A.weight", "prior.blocks.2.attention.to_q.lora_B.weight",
      "prior.blocks.2.attention.to_zz.lora_A.weight", "prior.blocks.2.attention.to_zz.lora_B.weight"], "not layers of the Wuerstchen prior"),
])
def test_lora_for_another_model_fails_clearly(tiny, tmp_path, keys, message):
    bad = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({k: torch.zeros(4, 32) if "lora_A" in k else torch.zeros(32, 4) for k in keys}, str(bad))
    # the first case as a real command (no traceback), the others through main() in this process
    launcher = "python" if "unet." in keys[0] else "inprocess"
    proc = run_script([INFER, "--checkpoint", bad, "--prompt", PROMPT, "--prior_model", tiny["prior"],
                       "--decoder_model", tiny["decoder"], "--output", tmp_path / "x.png"], check=False, launcher=launcher)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
