"""What users bring with them: the diffusers example's command line, subject training with prior
preservation, and warm starts from an existing LoRA."""

import json
import os
import shutil

import pytest
import torch
from conftest import TRAIN, make_image_dataset, prior_output, run_script, train_args
from safetensors.torch import load_file

from wuerstchen_lora import flags
from wuerstchen_lora import recipe as trainer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, UserError

# The LoRA command of diffusers' examples/wuerstchen/text_to_image/README.md, as it is written there
# (its script name, dataset and step count are the only things a test changes).
EXAMPLE_README_COMMAND = """
  --mixed_precision="fp16"
  --dataset_name=$DATASET_NAME --caption_column="text"
  --resolution=768
  --train_batch_size=8
  --num_train_epochs=100 --checkpointing_steps=5000
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0
  --seed=42
  --rank=4
  --validation_prompt="cute dragon creature"
  --report_to="wandb"
  --push_to_hub
  --output_dir="wuerstchen-prior-pokemon-lora"
"""


def example_argv(dataset, output_dir):
    import shlex

    command = EXAMPLE_README_COMMAND.replace("$DATASET_NAME", shlex.quote(dataset))
    return [w.replace("wuerstchen-prior-pokemon-lora", output_dir) for w in shlex.split(command)]


def test_the_diffusers_example_readme_command_runs(tiny, tmp_path, monkeypatch):
    """The example README's command, with this script's name, the tiny models' paths and a step
    count: wandb logs (offline), validation renders, and the upload goes to the given repo."""
    import huggingface_hub
    import huggingface_hub.constants

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def whoami(self):  # the login check at the start of the run
            uploads.append(("whoami", self.token))
            return {"name": "someone", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(self, repo_id, exist_ok=False):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            uploads.append(("upload", repo_id, sorted(allow_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wuerstchen-prior-pokemon-lora"
    argv = example_argv(tiny["dataset"], str(out)) + [
        "--pretrained_prior_model_name_or_path", tiny["prior"], "--pretrained_decoder_model_name_or_path", tiny["decoder"],
        "--image_encoder", tiny["image_encoder"], "--max_train_steps", "2"]
    proc = run_script([TRAIN, *argv], launcher="inprocess")
    assert (out / LORA_WEIGHTS_NAME).is_file()
    assert sorted(os.listdir(out / "validation")) == ["step-000002-0.png"]  # the alias of --validation_prompts
    record = json.loads((out / "args.json").read_text())
    assert record["lora"]["rank"] == 4 and record["validation"]["validation_prompts"] == ["cute dragon creature"]
    assert record["optim"]["mixed_precision"] == "no" and "needs CUDA" in proc.stdout  # fp16 asked for, on a CPU
    assert uploads[0] == ("whoami", None)  # before training
    assert uploads[1] == ("create", "wuerstchen-prior-pokemon-lora")
    assert uploads[2][1] == "wuerstchen-prior-pokemon-lora" and LORA_WEIGHTS_NAME in uploads[2][2]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb logged nothing"


def test_example_flags_mean_what_they_mean_there(tiny, tmp_path, capsys):
    base = ["--dataset", tiny["dataset"], "--output_dir", str(tmp_path / "o")]
    cfg = flags.parse_args(base + ["--local_rank", "3", "--report_to", "all", "--tracker_project_name", "mine",
                                     "--validation_epochs", "2", "--dataset_config_name", "small"])
    assert cfg.output.report_to == "all" and cfg.output.tracker_project_name == "mine"
    assert cfg.validation.validation_epochs == 2 and cfg.validation.validation_steps is None
    assert cfg.data.dataset_config_name == "small" and "local_rank" not in cfg.flat()
    assert flags.parse_args(base).validation.validation_steps == 100
    with pytest.raises(UserError, match="--validation_steps and --validation_epochs both"):
        flags.parse_args(base + ["--validation_epochs", "2", "--validation_steps", "5"])
    capsys.readouterr()
    cfg = flags.parse_args(base + ["--push_to_hub", "--hub_token", "hf_secret_value"])
    assert capsys.readouterr().err.startswith("warning: --hub_token is used for the upload only")
    assert cfg.hub.hub_token == "hf_secret_value" and "hf_secret_value" not in json.dumps(cfg.to_dict()) + repr(cfg)


def test_a_missing_tracker_package_is_said(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    flags.parse_args(["--dataset", "d", "--report_to", "wandb"])
    assert capsys.readouterr().err.startswith("warning: --report_to wandb: wandb is not installed, so nothing is logged there")
    flags.parse_args(["--dataset", "d", "--report_to", "tensorboard"])
    assert capsys.readouterr().err == ""


def test_dataset_config_name_reaches_load_dataset(monkeypatch):
    import datasets

    from wuerstchen_lora import data

    seen = {}

    def fake_load_dataset(name, config=None, **kwargs):
        seen.update(name=name, config=config)
        raise FileNotFoundError("not here")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserError):
        data.load_training_dataset("someone/images", config_name="small")
    assert seen == {"name": "someone/images", "config": "small"}


def test_validation_epochs_become_steps_and_the_token_is_never_written(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    # 8 images, batch 2: 4 steps an epoch; every 2 epochs over 3 epochs -> step 8, and the end (12)
    run_script(train_args(tiny, out, steps=12, extra=["--validation_prompt", "a red circle", "--validation_epochs", "2",
                                                      "--checkpointing_steps", "6", "--hub_token", "hf_secret_value"]),
               launcher="inprocess")
    assert sorted(os.listdir(out / "validation")) == ["step-000008-0.png", "step-000012-0.png"]
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"hf_secret_value" not in f.read(), name


# ----------------------------------------------------------------------------------------------
# Subject training with prior preservation


def subject_args(tiny, instance, out, *extra, steps=4):
    return [TRAIN, "--pretrained_prior_model_name_or_path", tiny["prior"], "--pretrained_decoder_model_name_or_path", tiny["decoder"],
            "--image_encoder", tiny["image_encoder"], "--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog",
            "--output_dir", out, "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps), "--report_to", "none",
            "--embeddings_cache_dir", os.path.join(os.path.dirname(out), "cache"), "--random_flip", "--caption_dropout", "0.2", *extra]


@pytest.fixture(scope="module")
def instance_images(tmp_path_factory):
    folder = make_image_dataset(tmp_path_factory.mktemp("subject") / "dog", "txt_captions", n=4)
    for name in os.listdir(folder):
        if name.endswith(".txt"):
            os.remove(os.path.join(folder, name))  # subject photos come without captions
    return folder


def test_prior_preservation(tiny, instance_images, tmp_path):
    """Weight 0 gives the plain subject run exactly (same instance losses, same LoRA); the class
    loss comes from the class examples (another class prompt, another class loss); the class
    examples are cached and reused."""
    def info(out):
        return json.loads((out / "training_info.json").read_text())

    plain = tmp_path / "plain"
    run_script(subject_args(tiny, instance_images, str(plain)), launcher="inprocess")
    preserve = ["--with_prior_preservation", "--num_class_images", "3", "--prior_loss_weight", "0"]
    dog = tmp_path / "dog"
    first = run_script(subject_args(tiny, instance_images, str(dog), *preserve, "--class_prompt", "a photo of a dog"), launcher="inprocess")
    assert "class examples: 0 real, 3 generated by the base prior" in first.stdout and "(from the cache)" not in first.stdout
    assert info(dog)["loss_history"] == info(plain)["loss_history"]
    a, b = load_file(str(plain / LORA_WEIGHTS_NAME)), load_file(str(dog / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cat = tmp_path / "cat"
    run_script(subject_args(tiny, instance_images, str(cat), *preserve, "--class_prompt", "a photo of a cat"), launcher="inprocess")
    dog_class, cat_class = info(dog)["class_loss_history"], info(cat)["class_loss_history"]
    assert len(dog_class) == 4 and all(loss > 0 for _, loss in dog_class) and dog_class != cat_class

    again = tmp_path / "again"
    weighted = ["--with_prior_preservation", "--num_class_images", "3", "--class_prompt", "a photo of a dog"]
    second = run_script(subject_args(tiny, instance_images, str(again), *weighted), launcher="inprocess")
    assert "(from the cache)" in second.stdout
    total, classes = dict(info(again)["loss_history"]), dict(info(again)["class_loss_history"])
    assert total != dict(info(plain)["loss_history"])  # weight 1: the class loss counts
    # step 1 (before the updates differ): total = instance + 1.0 x class, the class loss the weight-0 run logged
    assert classes[1] == pytest.approx(dict(dog_class)[1], abs=1e-6)
    assert total[1] == pytest.approx(dict(info(plain)["loss_history"])[1] + classes[1], abs=1e-5)


def test_real_class_images_come_first(tiny, instance_images, tmp_path):
    class_dir = make_image_dataset(tmp_path / "dogs", "txt_captions", n=2)
    out = tmp_path / "out"
    proc = run_script(subject_args(tiny, instance_images, str(out), "--with_prior_preservation", "--class_prompt", "a photo of a dog",
                                   "--class_data_dir", class_dir, "--num_class_images", "3", steps=2), launcher="inprocess")
    assert "class examples: 2 real, 1 generated by the base prior" in proc.stdout


@pytest.mark.parametrize("given, message", [
    (["--instance_data_dir", "x"], "--instance_data_dir needs --instance_prompt"),
    (["--instance_prompt", "a photo of sks dog"], "--instance_prompt needs --instance_data_dir"),
    (["--dataset", "d", "--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
    (["--dataset", "d", "--instance_data_dir", "x", "--instance_prompt", "p"], "--dataset and --instance_data_dir are two kinds"),
])
def test_subject_flag_mistakes(given, message):
    with pytest.raises(UserError, match=message):
        flags.parse_args(given)


# ----------------------------------------------------------------------------------------------
# Warm starts


def test_warm_start_begins_at_the_loaded_lora(tiny, trained, tmp_path):
    """Step 0 of --init_lora is the loaded LoRA: the recipe's prior gives what diffusers' own
    load_lora_weights of that file gives; its rank and alpha come from the file."""
    from wuerstchen_lora.models import build_prior_pipeline, load_prior_components

    cfg = flags.parse_args(train_args(tiny, str(tmp_path / "o"), extra=["--init_lora", str(trained)])[1:])
    assert (cfg.lora.rank, cfg.lora.lora_alpha) == (4, 8.0)  # the trained run's, not the defaults (8, 8)
    prior, *_ = trainer.load_frozen_models(cfg.model, "cpu", torch.float32)
    run = trainer.Run(cfg=cfg, accelerator=type("A", (), {"print": staticmethod(lambda *a: None)})())
    trainer.setup_lora(run, prior)
    warm = prior_output(prior)

    reference, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
    base = prior_output(reference)
    pipe = build_prior_pipeline(reference, text_encoder, tokenizer, scheduler)
    pipe.load_lora_weights(str(trained), weight_name=LORA_WEIGHTS_NAME)
    expected = prior_output(pipe.prior)
    assert not torch.allclose(base, expected, atol=1e-5)
    torch.testing.assert_close(warm, expected, rtol=1e-5, atol=1e-6)


def test_warm_start_trains_and_refuses_a_clash(tiny, trained, tmp_path, capsys):
    out = tmp_path / "out"
    run_script(train_args(tiny, out, steps=2, extra=["--init_lora", str(trained / LORA_WEIGHTS_NAME)]), launcher="inprocess")
    info = json.loads((out / "training_info.json").read_text())
    assert info["lora"]["r"] == 4 and info["lora"]["lora_alpha"] == 8
    code = trainer.main(train_args(tiny, str(tmp_path / "clash"), extra=["--init_lora", str(trained), "--rank", "16"])[1:])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "rank" in err, err
    assert not (tmp_path / "clash").exists()
    with pytest.raises(UserError, match="the file has to_k,to_out.0,to_q,to_v"):
        flags.parse_args(train_args(tiny, str(tmp_path / "o"), extra=["--init_lora", str(trained), "--lora_targets", "all-linear"])[1:])
    assert flags.parse_args(train_args(tiny, str(tmp_path / "o"), extra=["--init_lora", str(trained), "--lora_targets", "attn"])[1:]).lora.rank == 4
    shutil.rmtree(out)


def test_subject_warm_start_buckets_uncached_in_one_run_loads_in_diffusers(tiny, trained, instance_images, tmp_path):
    """The new paths together (prior preservation, a warm start, buckets, no cache, EMA): the LoRA
    file still loads in plain diffusers, with the same output as the same file loaded by this tool."""
    from wuerstchen_lora.models import build_prior_pipeline, load_prior_components
    from wuerstchen_lora.warmstart import load_init_lora, read_init_lora

    out = tmp_path / "out"
    run_script(subject_args(tiny, instance_images, str(out), "--with_prior_preservation", "--class_prompt", "a photo of a dog",
                            "--num_class_images", "2", "--init_lora", str(trained), "--aspect_ratio_buckets", "--no_cache_embeddings",
                            "--use_ema", "--learning_rate", "1e-2", steps=3), launcher="inprocess")
    from wuerstchen_lora.outputs import EMA_WEIGHTS_NAME

    prior, *_ = load_prior_components(tiny["prior"])
    mine = flags.parse_args(train_args(tiny, str(tmp_path / "o"), extra=["--init_lora", str(out)])[1:])
    assert (mine.lora.rank, mine.lora.lora_alpha) == (4, 8.0)  # the warm start's settings, carried on
    trainer.add_lora(prior, mine.lora)
    outputs = {}
    for name in (LORA_WEIGHTS_NAME, EMA_WEIGHTS_NAME):  # the EMA file too
        state, _ = read_init_lora(str(out / name))
        load_init_lora(prior, state)
        reference, text_encoder, tokenizer, scheduler = load_prior_components(tiny["prior"])
        pipe = build_prior_pipeline(reference, text_encoder, tokenizer, scheduler)
        pipe.load_lora_weights(str(out), weight_name=name)
        outputs[name] = prior_output(prior)
        torch.testing.assert_close(prior_output(pipe.prior), outputs[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[LORA_WEIGHTS_NAME], outputs[EMA_WEIGHTS_NAME], atol=1e-6)
    start, _ = read_init_lora(str(trained))
    trained_state, _ = read_init_lora(str(out))
    assert any(not torch.equal(start[k], trained_state[k]) for k in start), "training changed nothing"


def test_prior_preservation_resumes_exactly(tiny, instance_images, tmp_path):
    """Interrupted at a checkpoint and resumed == uninterrupted, class examples included (their order
    comes from (seed, epoch, batch), not from how far an iterator got)."""
    extra = ["--with_prior_preservation", "--class_prompt", "a photo of a dog", "--num_class_images", "3",
             "--checkpointing_steps", "3", "--learning_rate", "1e-2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script(subject_args(tiny, instance_images, str(full), *extra, steps=6), launcher="inprocess")
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run_script(subject_args(tiny, instance_images, str(resumed), *extra, "--resume_from_checkpoint", "latest", steps=6), launcher="inprocess")
    a, b = load_file(str(full / LORA_WEIGHTS_NAME)), load_file(str(resumed / LORA_WEIGHTS_NAME))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    history = json.loads((resumed / "training_info.json").read_text())["class_loss_history"]
    full_history = dict(map(tuple, json.loads((full / "training_info.json").read_text())["class_loss_history"]))
    assert [s for s, _ in history] == [4, 5, 6] and all(abs(full_history[s] - v) < 1e-6 for s, v in history)
