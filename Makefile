# make demo: the whole path (tiny random models, a few dozen CPU training steps, inference) offline.
# make test: the test suite. Both create .venv and install the requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_output
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/make_tiny_models.py $(DEMO)/models
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_wuerstchen_prior_lora.py \
		--pretrained_prior_model_name_or_path $(DEMO)/models/prior_repo \
		--pretrained_decoder_model_name_or_path $(DEMO)/models/decoder_repo \
		--image_encoder $(DEMO)/models/effnet.safetensors \
		--dataset $(DEMO)/models/data --resolution 128 --train_batch_size 4 --random_flip \
		--max_train_steps 40 --learning_rate 1e-3 --checkpointing_steps 20 \
		--validation_prompts "a red circle" --validation_steps 20 --output_dir $(DEMO)/lora --overwrite_output_dir
	$(PY) infer.py --checkpoint $(DEMO)/lora --prompt "a red circle" --height 256 --width 256 --output $(DEMO)/demo.png

clean:
	rm -rf $(DEMO)
