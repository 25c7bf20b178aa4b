"""LoRA training for the Wuerstchen v2 prior (Stage C).

models      loading the model parts, the EfficientNet encoder, the LoRA file, image generation
data        datasets, image checks, buckets, captions, the per-sample sampling plan
cache       the on-disk cache of EfficientNet and CLIP embeddings
objective   the training loss (shared by the trainer, validation, the benchmark and the tests)
recipe      arguments, set-up and the training loop (run by train_wuerstchen_prior_lora.py)
guard       the output-folder lock, resume checks, write failures as one line
outputs     checkpoints, the final LoRA and PEFT files, the model card, the hub upload
validation  validation images and the held-out loss
inference   the prior with a LoRA, then the decoder (run by infer.py)
"""
