"""Exports: the PEFT-format adapter and a prior with the LoRA merged in."""

import torch
from conftest import prior_output
from diffusers import WuerstchenPriorPipeline

from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import (
    LORA_WEIGHTS_NAME,
    PEFT_ADAPTER_DIR,
    WuerstchenPrior,
    load_prior_components,
)


def with_diffusers_lora(tiny, trained):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler).load_lora_weights(str(trained), weight_name=LORA_WEIGHTS_NAME)
    return prior_output(prior)


def test_peft_format_loads_in_peft_and_in_diffusers(tiny, trained):
    from peft import PeftModel

    expected = with_diffusers_lora(tiny, trained)
    folder = trained / PEFT_ADAPTER_DIR
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    base, *_ = load_prior_components(tiny["prior"])
    model = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(prior_output(model.base_model.model), expected, rtol=1e-4, atol=1e-5)
    model.load_adapter(str(folder), adapter_name="second")  # PEFT's own second-adapter path reads it too
    assert "second" in model.peft_config

    plain, *_ = load_prior_components(tiny["prior"])
    plain.load_lora_adapter(str(folder), weight_name="adapter_model.safetensors", prefix="base_model.model")
    torch.testing.assert_close(prior_output(plain), expected, rtol=1e-4, atol=1e-5)  # alpha 8, rank 4 restored


def test_merged_prior_is_a_plain_prior_with_the_lora_inside(tiny, trained, tmp_path, capsys):
    expected = with_diffusers_lora(tiny, trained)
    out = tmp_path / "merged"
    assert infer.main(["--checkpoint", str(trained), "--save_merged_prior", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    merged = WuerstchenPrior.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(prior_output(merged), expected, rtol=1e-4, atol=1e-5)


def test_hub_upload_plan_and_offline_error(trained):
    import pytest

    from wuerstchen_lora.models import UserError
    from wuerstchen_lora.outputs import hub_upload_plan, push_to_hub

    plan = hub_upload_plan(str(trained))
    assert {"pytorch_lora_weights.safetensors", "README.md", "training_info.json", "args.json",
            "peft_adapter/adapter_model.safetensors", "peft_adapter/adapter_config.json"} <= set(plan)
    assert any(p.startswith("validation/") for p in plan)
    # the model card shows the validation grid and the loss curve, and both travel with it
    assert {"validation_grid.png", "loss_curve.png"} <= set(plan)
    card = (trained / "README.md").read_text()
    assert "![validation images](validation_grid.png)" in card and "![training loss](loss_curve.png)" in card
    assert "url: validation/step-000030-0.png" in card
    assert not any(p.startswith(("checkpoint-", "embeddings_cache", "logs")) for p in plan)
    from wuerstchen_lora.config import HubConfig

    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1.*hf upload someone/my-lora"):
        push_to_hub(HubConfig(push_to_hub=True, hub_model_id="someone/my-lora"), str(trained))


def test_model_card_snippet_runs(trained, tiny):
    """The diffusers code in the model card works as written (on the CPU, in fp32, on the tiny models)."""
    import re

    card = (trained / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32").replace("path/to/this/folder", str(trained))
    code = code.replace("guidance_scale=4.0", "guidance_scale=4.0, num_inference_steps=2")
    code = code.replace('prior.load_lora_weights("', 'prior.load_lora_weights(weight_name="pytorch_lora_weights.safetensors", pretrained_model_name_or_path_or_dict="')
    import importlib.util

    if importlib.util.find_spec("diffusers.pipelines.deprecated.wuerstchen") is None:  # diffusers < 0.38, as the card says
        code = code.replace("diffusers.pipelines.deprecated.wuerstchen", "diffusers.pipelines.wuerstchen")
    scope = {}
    exec(compile(code, "model card", "exec"), scope)
    assert scope["image"].size == (128, 128)
