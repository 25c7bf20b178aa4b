"""Held-out validation loss: a split of the dataset or a separate one, fixed noise and timesteps."""

import json

import pytest
import torch
from conftest import run_script, train_args

from wuerstchen_lora import flags, objective
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.data import load_training_dataset
from wuerstchen_lora.models import load_image_encoder, load_prior_components
from wuerstchen_lora.validation import HeldOutLoss


class OneProcess:
    device = torch.device("cpu")

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_held_out_loss_is_fixed_for_fixed_weights(tiny):
    prior, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    image_encoder = load_image_encoder(tiny["image_encoder"])
    args = flags.parse_args(["--dataset", tiny["dataset"], "--resolution", "64", "--train_batch_size", "3"])
    dataset, image_column, caption_column = load_training_dataset(tiny["dataset"])
    held_out = HeldOutLoss(dataset.select(range(5)), (image_column, caption_column), args.data.resolution, args.data.caption_prefix,
                           args.optim.train_batch_size, args.seed,
                           lambda px: objective.encode_images(image_encoder, px),
                           lambda c: objective.encode_text(text_encoder, tokenizer, c, "cpu"))
    prior.train()
    first = held_out(prior, scheduler, OneProcess())
    assert held_out(prior, scheduler, OneProcess()) == first  # dropout off, same noise
    assert prior.training  # the training mode comes back
    with torch.no_grad():
        prior.out[1].weight.mul_(1.5)
    assert held_out(prior, scheduler, OneProcess()) != first


@pytest.mark.parametrize("how", ["split", "dataset"])
def test_validation_loss_is_logged(tiny, dataset_factory, tmp_path, how):
    if how == "split":
        extra = ["--validation_split", "0.25"]
    else:
        extra = ["--validation_dataset", dataset_factory("jsonl", n=3)]  # other column names than the training set
    out = tmp_path / "out"
    run_script(train_args(tiny, out, steps=4, extra=extra + ["--validation_steps", "2"]), launcher="inprocess")
    info = json.loads((out / "training_info.json").read_text())
    assert sorted(info["validation_loss"]) == ["2", "4"]
    assert all(v > 0 for v in info["validation_loss"].values())
    assert (info["data"]["images"], info["data"]["held_out_images"]) == ((6, 2) if how == "split" else (8, 3))


def test_split_and_separate_set_exclude_each_other(capsys):
    assert trainer.main(["--dataset", "d", "--validation_split", "0.1", "--validation_dataset", "v"]) == 2
    assert "excludes --validation_dataset" in capsys.readouterr().err
