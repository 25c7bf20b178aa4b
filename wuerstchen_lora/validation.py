"""Validation during training: images rendered with the LoRA attached, and a loss on held-out
images at fixed noise and timesteps (so that two evaluations differ only by the weights)."""

import os

import torch

from wuerstchen_lora.models import (
    DEFAULT_DECODER,
    UserError,
    build_prior_pipeline,
    generate_images,
    load_decoder_pipeline,
    output_size_for_training_resolution,
    save_png,
)
from wuerstchen_lora.objective import compute_loss

# Timesteps of the held-out loss: spread over the schedule, the same at every evaluation.
HELD_OUT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def prior_sharding(accelerator):
    """'FSDP' or 'DeepSpeed ZeRO-3' when the prior's weights are sharded over the processes, else None.

    Validation runs on the main process while the others go on: with a sharded prior its forward
    would wait forever for the other processes' shards, so validation is then left out.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if getattr(plugin, "zero_stage", None) == 3:
            return "DeepSpeed ZeRO-3"
    return None


def make_validator(cfg, accelerator, text_encoder, tokenizer, scheduler, dtype, bucket=None):
    """The Validator for --validation_prompts (decoder loaded now), or None: no prompts, or a sharded prior."""
    if not cfg.validation.validation_prompts:
        return None
    sharding = prior_sharding(accelerator)
    if sharding:
        accelerator.print(f"note: validation images are not rendered under {sharding} (the main process cannot run a sharded prior alone); "
                          "use infer.py on a checkpoint-N folder")
        return None
    w, h = bucket or (cfg.data.resolution, cfg.data.resolution)
    return Validator(cfg.model.pretrained_decoder_model_name_or_path, cfg.validation.validation_prompts, cfg.seed,
                     os.path.join(cfg.output.output_dir, "validation"), (w, h), accelerator, text_encoder, tokenizer, scheduler, dtype)


def make_held_out_loss(loaded, cfg, accelerator, encoders):
    """The HeldOutLoss for --validation_split/--validation_dataset, or None: no held-out set, or a sharded prior.
    `loaded`: recipe.LoadedData; `encoders`: recipe.Encoders."""
    if loaded.held_out is None:
        return None
    sharding = prior_sharding(accelerator)
    if sharding:
        accelerator.print(f"note: the held-out validation loss is not computed under {sharding} (the main process cannot run a sharded prior alone); "
                          "its images still stay out of training")
        return None
    return HeldOutLoss(loaded.held_out, (loaded.image_column, loaded.caption_column), cfg.data.resolution, cfg.data.caption_prefix,
                       cfg.optim.train_batch_size, cfg.seed, encoders.image, encoders.text)


class Validator:
    """Renders the validation prompts with the LoRA attached.

    The decoder is loaded when this is made, during setup and on the main process (the one that
    renders): a missing or broken decoder stops the run before training, on every process alike.
    It waits on the CPU between validations.
    """

    def __init__(self, decoder_path, prompts, seed, folder, size, accelerator, text_encoder, tokenizer, scheduler, dtype):
        self.prompts, self.seed, self.folder, self.accelerator = list(prompts), seed, folder, accelerator
        self.text_encoder, self.tokenizer, self.scheduler, self.dtype = text_encoder, tokenizer, scheduler, dtype
        self.decoder, error = None, None
        if accelerator.is_main_process:
            path = decoder_path
            if (os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1) and not os.path.isdir(os.path.expanduser(path)):
                error = (f"--pretrained_decoder_model_name_or_path {path}: no such folder; give the decoder's hub id "
                         f"({DEFAULT_DECODER}) or a folder laid out like it, or leave out --validation_prompts")
            else:
                try:
                    self.decoder = load_decoder_pipeline(os.path.expanduser(path), dtype=dtype, device="cpu")
                except UserError as e:
                    error = f"{e} (the decoder renders --validation_prompts: fix --pretrained_decoder_model_name_or_path or leave out --validation_prompts)"
        if accelerator.num_processes > 1:  # the others stop too, rather than wait for the main process in a collective
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise UserError(error)
        # The output size that matches the training size (about 4/3 of it): the square, or the most common bucket.
        w, h = size
        self.width, self.height = output_size_for_training_resolution(w), output_size_for_training_resolution(h)

    def __call__(self, prior, step):
        from diffusers import DDPMWuerstchenScheduler

        accelerator = self.accelerator
        self.decoder.to(accelerator.device)
        pipeline = build_prior_pipeline(prior, self.text_encoder, self.tokenizer, DDPMWuerstchenScheduler.from_config(self.scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        was_training = prior.training
        prior.eval()
        generator = torch.Generator(device=accelerator.device).manual_seed(self.seed)
        home = self.text_encoder.device  # the CPU once the embedding cache is built
        self.text_encoder.to(accelerator.device)
        with torch.autocast(accelerator.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            images = generate_images(pipeline, self.decoder, self.prompts, height=self.height, width=self.width, generator=generator)
        self.text_encoder.to(home)
        self.decoder.to("cpu")  # its device memory is the training's again
        prior.train(was_training)
        paths = []
        for i, image in enumerate(images):
            paths.append(os.path.join(self.folder, f"step-{step:06d}-{i}.png"))
            save_png(image, paths[-1])
        log_images(accelerator, images, self.prompts, step)
        return paths


def log_images(accelerator, images, prompts, step):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("val/images", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"val/images": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)


class HeldOutLoss:
    """Embeddings of held-out images (centre crop, no flip, first caption), encoded once, with a
    fixed noise per sample and timestep; `__call__` gives the prior's mean loss on them."""

    def __init__(self, dataset, columns, resolution, caption_prefix, batch_size, seed, encode_image, encode_text):
        from wuerstchen_lora.data import ImageTransform, pick_caption

        image_column, caption_column = columns
        transform = ImageTransform(resolution, center_crop=True, random_flip=False)
        self.batches = []
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            pixels = torch.stack([transform(row[image_column], None) for row in rows])
            captions = [caption_prefix + pick_caption(_first(row[caption_column]), None) for row in rows]
            image = encode_image(pixels).float().cpu()
            g = torch.Generator().manual_seed(seed + start)
            noise = torch.randn((len(HELD_OUT_TIMESTEPS),) + tuple(image.shape), generator=g)
            self.batches.append((image, encode_text(captions).cpu(), noise))
        self.size = len(dataset)

    @torch.no_grad()
    def __call__(self, prior, scheduler, accelerator):
        was_training = prior.training
        prior.eval()
        total = 0.0
        device = accelerator.device
        for image, text, noise in self.batches:
            image, text = image.to(device), text.to(device)
            for k, t in enumerate(HELD_OUT_TIMESTEPS):
                timesteps = torch.full((image.shape[0],), t, device=device)
                with accelerator.autocast():
                    loss = compute_loss(prior, scheduler, image, text, noise[k].to(device), timesteps)
                total += loss.item() * image.shape[0]
        prior.train(was_training)
        return total / (self.size * len(HELD_OUT_TIMESTEPS))


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value
