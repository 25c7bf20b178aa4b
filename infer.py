#!/usr/bin/env python
"""Generate images with a trained Wuerstchen prior LoRA: prior + LoRA -> decoder -> PNG (or JPEG, WebP) files.

    python infer.py --checkpoint out --prompt "yoda pokemon"
    python infer.py --checkpoint out/checkpoint-500 --prompt "yoda pokemon" --num_images 4 --output yoda.png
    python infer.py --checkpoint someone/my-wuerstchen-lora --revision main --prompt "yoda pokemon"   # a LoRA on the hub

The base prior and decoder come from the `training_info.json` that training wrote beside the LoRA
file (else the hub defaults); `--prior_model`/`--decoder_model` override them. So does the default
size (the one the training resolution maps to). Without --output the images are named after the
prompt and seed (a-red-circle-s0.png); an existing file is replaced only with --overwrite.
"""

import sys

from wuerstchen_lora.inference import main

if __name__ == "__main__":
    sys.exit(main())
