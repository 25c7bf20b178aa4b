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

# The demo teaches a small pretrained prior a new word ("a zorb", a magenta star; bench/world.py) and
# prints how often the prior generates it before and after: about 0.0 before, most of the time after.
demo: setup
	$(PY) -m bench.world build $(DEMO)/world --quick
	$(PY) -m bench.world score $(DEMO)/world
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_wuerstchen_prior_lora.py \
		--pretrained_prior_model_name_or_path $(DEMO)/world/prior_repo \
		--pretrained_decoder_model_name_or_path $(DEMO)/world/decoder_repo \
		--image_encoder $(DEMO)/world/effnet.safetensors \
		--dataset $(DEMO)/world/concept_data --resolution 96 --train_batch_size 8 --rank 4 \
		--max_train_steps 150 --learning_rate 1e-3 --checkpointing_steps 75 \
		--validation_prompts "a zorb" --validation_steps 75 --output_dir $(DEMO)/lora --overwrite_output_dir
	$(PY) -m bench.world score $(DEMO)/world --lora $(DEMO)/lora
	$(PY) infer.py --checkpoint $(DEMO)/lora --prompt "a zorb" --height 128 --width 128 --output $(DEMO)/demo.png --overwrite

clean:
	rm -rf $(DEMO)
