"""infer.py never exits 0 with garbage (issue 24): a LoRA file holding NaN/inf is refused when the
file is checked, before any model loads; one whose values overflow (scaled by 1e30) is refused when
the prior's image embeddings come out non-finite, before anything is decoded or written; a merged
prior that would hold NaN/inf is not written. Each refusal: one `error:` line, status 2, no
traceback, earlier files untouched and nothing new beside them."""

import pytest
import torch
from conftest import INFER, run_script
from safetensors.torch import save_file

from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME

EARLIER = b"written before: must stay"


def lora_tensors(scale=1.0, rank=4, width=32):
    """A LoRA for the tiny prior (width 32) with random values, in the layout training writes."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for block in (2, 5):
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"prior.blocks.{block}.attention.{name}"
            out[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=g) * 0.1 * scale
            out[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g) * 0.1 * scale
    return out


def lora_folder(tmp_path, tensors):
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / LORA_WEIGHTS_NAME))
    return folder


def refused(argv, tmp_path, *needles):
    """infer.py with `argv` ends in one `error:` line holding `needles`, status 2; the file written
    before at --output stays as it was (even with --overwrite) and no image appears beside it."""
    output = tmp_path / "earlier.png"
    output.write_bytes(EARLIER)
    proc = run_script([INFER, *argv, "--output", output, "--overwrite", "--device", "cpu"], launcher="inprocess", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert output.read_bytes() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["earlier.png"]
    return lines[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_lora_file_holding_nan_or_inf_is_refused_before_models_load(tmp_path, monkeypatch, bad):
    tensors = lora_tensors()
    key = "prior.blocks.5.attention.to_v.lora_B.weight"
    tensors[key][3, 1] = bad
    folder = lora_folder(tmp_path, tensors)
    before = (folder / LORA_WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(infer, "load_prior_components", lambda *a, **k: pytest.fail("models were loaded before the refusal"))
    for extra in ([], ["--save_merged_prior", str(tmp_path / "merged")]):
        refused(["--checkpoint", folder, "--prompt", "x", *extra], tmp_path, "1 of 16 LoRA tensors hold NaN or inf values", key,
                "earlier checkpoint-N", "--learning_rate")
    assert (folder / LORA_WEIGHTS_NAME).read_bytes() == before and not (tmp_path / "merged").exists()


def test_a_lora_whose_values_overflow_is_refused_before_decoding(tiny, tmp_path, monkeypatch):
    folder = lora_folder(tmp_path, lora_tensors(scale=1e30))  # finite in the file, overflowing in the prior
    models = ["--prior_model", tiny["prior"], "--decoder_model", tiny["decoder"]]
    real = infer.load_decoder_pipeline

    def decoder_that_must_not_run(*a, **k):
        pipe = real(*a, **k)
        monkeypatch.setattr(pipe.decoder, "forward", lambda *a, **k: pytest.fail("non-finite embeddings were decoded"))
        return pipe

    monkeypatch.setattr(infer, "load_decoder_pipeline", decoder_that_must_not_run)
    line = refused(["--checkpoint", folder, "--prompt", "a red circle", "--height", "128", "--width", "128", "--decoder_steps", "1", *models],
                   tmp_path, "the prior's image embeddings for 'a red circle' hold", "NaN or inf", f"with the LoRA {folder / LORA_WEIGHTS_NAME}",
                   "--lora_scale 1", "no image was written", "smaller --lora_scale")
    assert "fp32" in line
    merged = tmp_path / "merged"
    refused(["--checkpoint", folder, "--save_merged_prior", merged, *models], tmp_path, "merging the LoRA", "--lora_scale 1",
            "NaN or inf", "nothing was written")
    assert not merged.exists()
