"""The LoRA learns: a small version of bench/learning.py that runs in the suite.

A tiny prior is pretrained in the test session on six classes of coloured shapes (bench/world.py, with
its own plain loop: not the trainer's code). The trainer then teaches it a seventh ("a zorb", a magenta
star). Afterwards the prior pipeline, with its own scheduler and defaults and the LoRA loaded by
infer.py's loader, must generate embeddings that a nearest-centroid classifier puts in the new class
(the base prior never does), and the references' denoising loss on fresh pictures of the concept must
fall below the base prior's.

Broken once on purpose each, the test failed: the LoRA not loaded at generation (accuracy 0.00, loss
1.00 x the base's), the trainer's timesteps flipped to 1 - t (accuracy 0.53 but loss 1.05 x), timesteps
x 1000 (accuracy 0.38, loss 0.94 x), embeddings without the (x + 1) / 42 scaling (accuracy 0.09, loss
4.6e5 x). See the README.
"""

import pytest

from tests.conftest import TRAIN, run_script

STEPS = 200


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    import torch

    from bench import world as W

    with torch.random.fork_rng():  # about 45 s on 2 cores (the benchmark's world: 3 min)
        return W.build_world(tmp_path_factory.mktemp("world"), **W.QUICK, decoder=False, log=lambda *_: None)


@pytest.fixture(scope="session")
def learned(world, tmp_path_factory):
    """{"base": ..., "lora": ...}: concept accuracy and the concept's denoising loss, without and with the LoRA."""
    from bench import world as W
    from wuerstchen_lora.models import load_image_encoder

    out = tmp_path_factory.mktemp("learned") / "lora"
    run_script([TRAIN, "--pretrained_prior_model_name_or_path", world["prior_repo"], "--image_encoder", world["image_encoder"],
                "--dataset", world["concept_data"], "--resolution", W.RESOLUTION, "--train_batch_size", 8, "--rank", 4,
                "--learning_rate", "1e-3", "--max_train_steps", STEPS, "--checkpointing_steps", 0, "--report_to", "none",
                "--output_dir", out], launcher="inprocess")
    classifier, encoder = W.Classifier.load(world["classifier"]), load_image_encoder(world["image_encoder"])
    scores = {}
    for name, pipe in (("base", W.prior_pipeline(world["prior_repo"])),
                       ("lora", W.prior_pipeline(world["prior_repo"], str(out / "pytorch_lora_weights.safetensors"), via="infer"))):
        scores[name] = W.evaluate(pipe, classifier, n=32, old=False)
        scores[name]["loss"] = W.denoising_loss(pipe, W.CONCEPT, encoder)
    return scores


def test_the_trained_lora_generates_the_new_concept(learned):
    # Measured: 0.00 -> 0.75.
    base, lora = learned["base"], learned["lora"]
    assert base["concept"] <= 0.25, f"the base prior already makes the concept: {learned}"
    assert lora["concept"] >= base["concept"] + 0.5, f"the LoRA did not learn the concept: {learned}"


def test_the_lora_lowers_the_references_loss_on_the_concept(learned):
    # Measured: 0.267 -> 0.225 (0.84 x). A LoRA trained with flipped timesteps raises it (1.05 x).
    assert learned["lora"]["loss"] <= 0.9 * learned["base"]["loss"], f"the LoRA does not denoise the concept better: {learned}"
