"""Adapter variants, optimisers, loss weighting, noise offset and EMA."""

import math

import pytest
import torch
from conftest import prior_output, run_script, train_args
from diffusers import WuerstchenPriorPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from wuerstchen_lora import flags, objective
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import (
    LORA_WEIGHTS_NAME,
    load_prior_components,
    lora_config_dict,
    save_lora_file,
)
from wuerstchen_lora.outputs import EMA_WEIGHTS_NAME


def variant_args(tiny, *given):
    return flags.parse_args(["--dataset", tiny["dataset"], "--pretrained_prior_model_name_or_path", tiny["prior"],
                             "--image_encoder", tiny["image_encoder"], "--rank", "4", *given])


@pytest.mark.parametrize("given, n_modules", [
    ([], 8),
    (["--lora_alpha", "16", "--use_rslora"], 8),
    (["--use_dora"], 8),
    (["--lora_targets", "attn-mlp"], 8 + 4),
    (["--lora_targets", "all-linear", "--lora_alpha", "2"], 8 + 4 + 2 + 2 + 2),
])
def test_every_variant_loads_through_diffusers_unchanged(tiny, tmp_path, given, n_modules):
    args = variant_args(tiny, *given)
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    config, params, names = trainer.add_lora(prior, args.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # a "trained" adapter: every LoRA tensor non-trivial
    expected = prior_output(prior)
    state = get_peft_model_state_dict(prior)
    assert len({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}) == n_modules
    save_lora_file(str(tmp_path), state, lora_config_dict(config))

    fresh, *_ = load_prior_components(tiny["prior"])
    base = prior_output(fresh)
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=fresh, scheduler=scheduler)
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_NAME)  # older diffusers need the name offline
    got = prior_output(fresh)
    assert not torch.allclose(got, base)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_explicit_modules_override_presets(tiny):
    assert variant_args(tiny, "--lora_targets", "all-linear", "--lora_target_modules", "to_q").lora.lora_target_modules == ("to_q",)
    assert variant_args(tiny).lora.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def test_loss_weights_follow_their_formulas(tiny):
    *_, scheduler = load_prior_components(tiny["prior"])
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    s = 0.008  # the scheduler's cosine schedule, written out independently here
    abar = (torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(1e-4, 0.9999)
    snr = abar / (1 - abar)
    torch.testing.assert_close(objective.loss_weights(scheduler, t, "p2"), 1 / (1 + snr))
    torch.testing.assert_close(objective.loss_weights(scheduler, t, "min_snr", 5.0), torch.clamp(snr, max=5.0) / snr)
    assert objective.loss_weights(scheduler, t, "none") is None
    w = objective.loss_weights(scheduler, t, "min_snr", 5.0)
    assert w[0] < 1 and w[-1] == pytest.approx(1.0)  # high-SNR (small t) samples are down-weighted


def test_unweighted_loss_is_plain_mse(tiny):
    prior, _, _, scheduler = load_prior_components(tiny["prior"])
    g = torch.Generator().manual_seed(0)
    emb, noise = torch.randn(3, 16, 2, 2, generator=g), torch.randn(3, 16, 2, 2, generator=g)
    t, text = torch.rand(3, generator=g), torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        loss = objective.compute_loss(prior.eval(), scheduler, emb, text, noise, t)
        pred = prior(scheduler.add_noise(emb, noise, t), t, text)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise))


def test_noise_offset_shifts_each_channel_and_is_reproducible():
    from wuerstchen_lora.data import sample_noise

    def draw(offset):
        noises, timesteps = zip(*(sample_noise(seed, (16, 8, 8), offset) for seed in (1, 2, 3)))
        return torch.stack(noises), torch.stack(timesteps)

    plain, t0 = draw(0.0)
    offset, t1 = draw(0.5)
    again, _ = draw(0.5)
    assert torch.equal(offset, again) and torch.equal(t0, t1)
    shift = (offset - plain).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-6)  # one constant per sample and channel
    assert shift.abs().max() > 0


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_optimizers_take_a_step(tiny, optimizer):
    lr = "1.0" if optimizer == "prodigy" else "1e-2"
    args = variant_args(tiny, "--optimizer", optimizer, "--learning_rate", lr)
    param = torch.nn.Parameter(torch.ones(4, 4))
    opt = trainer.make_optimizer(args.optim, [param], "cpu")
    (param ** 2).sum().backward()
    opt.step()
    assert not torch.equal(param.detach(), torch.ones(4, 4))


def test_ema_file_is_written_loadable_and_smoother(tiny, tmp_path):
    out = tmp_path / "out"
    run_script(train_args(tiny, out, steps=6, extra=["--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-2"]), launcher="inprocess")
    raw, ema = load_file(out / LORA_WEIGHTS_NAME), load_file(out / EMA_WEIGHTS_NAME)
    assert raw.keys() == ema.keys()
    b_keys = [k for k in raw if "lora_B" in k]
    # lora_B starts at 0: the average lags behind the raw weights, so it is smaller but not zero
    assert all(0 < ema[k].norm() < raw[k].norm() for k in b_keys)
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)
    pipe.load_lora_weights(str(out), weight_name=EMA_WEIGHTS_NAME)
