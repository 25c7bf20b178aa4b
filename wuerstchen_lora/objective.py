"""The training objective of the Wuerstchen v2 prior, in one place: the trainer, validation's
held-out loss, the benchmark and the tests all import it from here.

REFERENCE: images -> EfficientNet -> (x + 1) / 42; t ~ U(0, 1) in fp32; x_t = scheduler.add_noise;
the prior predicts the noise; MSE in fp32, optionally weighted per sample by the SNR.
"""

import hashlib

import torch
import torch.nn.functional as F

from wuerstchen_lora.models import EMBEDDING_SCALE, EMBEDDING_SHIFT


@torch.no_grad()
def encode_images(image_encoder, pixel_values):
    """EfficientNet features scaled as the prior expects: (effnet(x) + 1) / 42."""
    return (image_encoder(pixel_values) + EMBEDDING_SHIFT) / EMBEDDING_SCALE


@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions, device):
    """CLIP last_hidden_state of captions padded/truncated to 77 tokens, as the prior pipeline does."""
    tokens = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    if torch.device(device).type == "cuda":  # a copy from pageable memory would wait for the queued GPU work
        ids, mask = ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
    out = text_encoder(ids.to(device), attention_mask=mask.to(device))
    return out.last_hidden_state


def loss_weights(scheduler, timesteps, weighting, snr_gamma=5.0):
    """Per-sample loss weights from the signal-to-noise ratio SNR = abar / (1 - abar) at t.

    p2 is the weight the original Wuerstchen authors trained with, (1 + SNR)^-1 (k = 1, gamma = 1);
    min_snr is Hang et al. 2023 for epsilon prediction, min(SNR, gamma) / SNR. abar comes from the
    scheduler's own cosine schedule (its clamped `_alpha_cumprod`), the one add_noise uses.
    """
    if weighting == "none":
        return None
    alpha_bar = scheduler._alpha_cumprod(timesteps, timesteps.device)
    snr = alpha_bar / (1 - alpha_bar)
    if weighting == "p2":
        return 1 / (1 + snr)
    return torch.clamp(snr, max=snr_gamma) / snr


def compute_loss(prior, scheduler, image_embeddings, text_embeddings, noise=None, timesteps=None, weighting="none", snr_gamma=5.0):
    """Epsilon-prediction MSE at t ~ U(0, 1), optionally weighted per sample.

    t stays fp32: the prior embeds t * 10000, which fp16 would quantise badly. The loss is computed
    in fp32 whatever dtype the prior runs in.
    """
    latents = image_embeddings.float()
    if noise is None:
        noise = torch.randn_like(latents)
    if timesteps is None:
        timesteps = torch.rand(latents.shape[0], device=latents.device, dtype=torch.float32)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = prior(noisy, timesteps, text_embeddings)
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = loss_weights(scheduler, timesteps, weighting, snr_gamma)
    return per_sample.mean() if weights is None else (weights * per_sample).mean()


def scheduler_to(scheduler, device):
    """Keep the noise schedule's two constants on the training device.

    DDPMWuerstchenScheduler copies them from the CPU on every add_noise call; a copy from pageable
    host memory makes the host wait for all queued GPU work, once per step.
    """
    scheduler.s = scheduler.s.to(device)
    scheduler._init_alpha_cumprod = scheduler._init_alpha_cumprod.to(device)
    return scheduler


def step_seed(seed, epoch, batch_index, process_index):
    """Seed for the global RNG in one step (the prior's dropout).

    Re-seeding every step from (seed, epoch, batch, rank) makes a resumed run draw exactly what an
    uninterrupted one would, however many numbers data loading or validation consumed meanwhile.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{batch_index}:{process_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
