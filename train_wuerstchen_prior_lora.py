#!/usr/bin/env python
"""Train a LoRA adapter on the Wuerstchen v2 prior (Stage C) and write `pytorch_lora_weights.safetensors`.

One GPU:
    accelerate launch train_wuerstchen_prior_lora.py --dataset lambdalabs/naruto-blip-captions \
        --output_dir out --train_batch_size 8 --random_flip --mixed_precision bf16
One subject from a few photos, with prior preservation (DreamBooth's flags):
    accelerate launch train_wuerstchen_prior_lora.py --instance_data_dir my_dog --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_prompt "a photo of a dog" --output_dir sks-dog
A warm start from an existing prior LoRA (fresh optimiser; not a resume):
    accelerate launch train_wuerstchen_prior_lora.py --dataset DATA --init_lora out --output_dir out2
Several GPUs (same script, accelerate does the distribution):
    accelerate launch --multi_gpu --num_processes 4 train_wuerstchen_prior_lora.py --dataset DATA --output_dir out
Tiny offline CPU run on random models (what `make demo` does):
    python tools/make_tiny_models.py /tmp/tiny && python train_wuerstchen_prior_lora.py \
        --pretrained_prior_model_name_or_path /tmp/tiny/prior_repo --image_encoder /tmp/tiny/effnet.safetensors \
        --dataset /tmp/tiny/data --resolution 64 --max_train_steps 10 --output_dir /tmp/tiny/out

The output folder then holds the LoRA file (diffusers' `load_lora_weights` reads it), a model card,
`training_info.json` (what infer.py needs) and `args.json`; `checkpoint-N/` folders resume a run.
A command written for diffusers' train_text_to_image_lora_prior.py runs with only the script name changed.
"""

import sys

from wuerstchen_lora.recipe import main

if __name__ == "__main__":
    sys.exit(main())
