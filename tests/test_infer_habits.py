"""Habits of other tools' users (issue 19): infer.py names its images after the prompt and seed
and never overwrites one without --overwrite, renders at the size the training resolution maps
to, takes --prior_steps, --batch_size and --cpu_offload, stores its settings in the PNG, and says
which flags to give for a LoRA without training_info.json; --push_to_hub checks the login and
the hub before training. In-process and small (128 px, a few steps); the hub is mocked."""

import os
import shutil

import httpx
import pytest
import torch
from conftest import INFER, run_script, train_args
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from PIL import Image

from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, UserError

QUICK = ["--prior_steps", "2", "--decoder_steps", "1", "--device", "cpu"]


def run_infer(*argv, check=True):
    return run_script([INFER, *argv], launcher="inprocess", check=check)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_default_name_training_size_png_text_and_overwrite(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_infer("--checkpoint", trained, "--prompt", "A red circle!", "--seed", "7", "--negative_prompt", "blue", *QUICK)
    path = tmp_path / "a-red-circle-s7.png"
    assert proc.stdout.split() == ["a-red-circle-s7.png"] and path.is_file()
    image = Image.open(path)
    assert image.size == (128, 128)  # trained at --resolution 128: 128 px, not 1024
    assert "note: generating at 128x128, the size the LoRA's training resolution 128 maps to" in proc.stderr
    text = image.text
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "lora", "lora_scale", "size", "prior_steps", "decoder_steps")} == {
        "prompt": "A red circle!", "negative_prompt": "blue", "seed": "7", "lora": str(trained), "lora_scale": "1",
        "size": "128x128", "prior_steps": "2", "decoder_steps": "1"}
    assert text["parameters"].startswith("A red circle!\nNegative prompt: blue\nSteps: 2, ") and "Seed: 7" in text["parameters"]
    before = path.read_bytes()
    # Again: refused before any model loads, the file as it was; --overwrite replaces it.
    monkeypatch.setattr(infer, "load_prior_components", lambda *a, **k: pytest.fail("models loaded before the refusal"))
    proc = run_infer("--checkpoint", trained, "--prompt", "A red circle!", "--seed", "7", *QUICK, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == ["error: a-red-circle-s7.png exists already; pass --overwrite to replace it, or give --output PATH or another --seed"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    explicit = tmp_path / "mine.png"
    explicit.write_bytes(b"earlier")
    proc = run_infer("--checkpoint", trained, "--prompt", "x", "--output", explicit, *QUICK, check=False)
    assert error_lines(proc.stderr) == [f"error: {explicit} exists already; pass --overwrite to replace it, or give another --output"]
    assert explicit.read_bytes() == b"earlier"
    run_infer("--checkpoint", trained, "--prompt", "x", "--output", explicit, "--overwrite", *QUICK)
    assert Image.open(explicit).text["prompt"] == "x"


def test_prompt_file_names_batches_and_per_prompt_seed(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na red circle\n")
    calls = []
    real = infer.generate_images

    def spy(*a, **k):
        calls.append((a[2], k["num_images_per_prompt"], k["prior_steps"], k["height"]))
        return real(*a, **k)

    monkeypatch.setattr(infer, "generate_images", spy)
    proc = run_infer("--checkpoint", trained, "--prompt_file", "prompts.txt", "--num_images", "2", "--batch_size", "1", *QUICK)
    names = ["a-red-circle-s0-0.png", "a-red-circle-s0-1.png", "a-blue-square-s0-0.png", "a-blue-square-s0-1.png",
             "a-red-circle-2-s0-0.png", "a-red-circle-2-s0-1.png"]
    assert proc.stdout.split() == names
    assert calls == [(["a red circle"], 1, 2, 128)] * 2 + [(["a blue square"], 1, 2, 128)] * 2 + [(["a red circle"], 1, 2, 128)] * 2
    assert [Image.open(tmp_path / n).text["image_index"] for n in names] == ["0", "1"] * 3
    # each prompt starts from --seed: the same prompt gives the same pictures wherever it stands in the file
    assert (tmp_path / names[0]).read_bytes() != (tmp_path / names[1]).read_bytes()
    assert Image.open(tmp_path / names[4]).tobytes() == Image.open(tmp_path / names[0]).tobytes()


def test_cpu_offload_is_refused_without_cuda_or_accelerate(trained, monkeypatch):
    import importlib.util

    argv = ["--checkpoint", str(trained), "--prompt", "x", "--cpu_offload"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--cpu_offload moves the models between the CPU and a CUDA GPU, but no CUDA GPU is visible .*leave --cpu_offload out"):
        infer.parse_args(argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="but --device cpu is not a CUDA GPU"):
        infer.parse_args(argv + ["--device", "cpu"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UserError, match="--cpu_offload needs the accelerate package.*pip install accelerate"):
        infer.parse_args(argv)


def test_cpu_offload_keeps_the_models_on_the_cpu_and_hands_them_to_diffusers(trained, monkeypatch):
    """No GPU here: the pipelines are built on the CPU and given to enable_model_cpu_offload (recorded)."""
    from diffusers import DiffusionPipeline

    offloaded = []
    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload", lambda self, gpu_id=None, device=None: offloaded.append((type(self).__name__, gpu_id)))
    args = infer.parse_args(["--checkpoint", str(trained), "--prompt", "x", "--device", "cpu"])
    args.device, args.cpu_offload = "cuda:1", True  # as parse_args leaves them on a machine with two GPUs
    prior_pipeline, decoder_pipeline = infer.load_pipelines(args, infer.resolve_lora_path(args.checkpoint))
    assert offloaded == [("WuerstchenPriorPipeline", 1), ("WuerstchenDecoderPipeline", 1)]
    assert prior_pipeline.prior.device.type == decoder_pipeline.decoder.device.type == "cpu"


def test_a_lora_without_training_info_names_the_model_flags_offline(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "from_the_diffusers_example"
    folder.mkdir()
    shutil.copy(trained / LORA_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME)  # the file alone, as the example writes it
    proc = run_infer("--checkpoint", folder, "--prompt", "x", "--output", tmp_path / "x.png", *QUICK, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    for needle in ("could not load the prior warp-ai/wuerstchen-prior", "has no training_info.json beside it", "diffusers example",
                   "HF_HUB_OFFLINE=1", "give --prior_model and --decoder_model"):
        assert needle in line, line
    assert f"note: {folder / LORA_WEIGHTS_NAME} has no training_info.json beside it: using --prior_model warp-ai/wuerstchen-prior" in proc.stderr
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# --push_to_hub: login and hub checked at the start


def hub_answer(kind):
    request = httpx.Request("GET", "https://huggingface.co/api/whoami-v2")
    return {
        "no token": LocalTokenNotFoundError("Token is required"),
        "refused token": HfHubHTTPError("Invalid user token.", response=httpx.Response(401, request=request)),
        "no hub": httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request),
        "read-only token": {"name": "someone", "auth": {"accessToken": {"role": "read"}}},
        "good": {"name": "someone", "auth": {"accessToken": {"role": "write"}}},
    }[kind]


REFUSALS = {
    "offline": ["the hub is switched off here (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE"],
    "no token": ["not logged in to the hub", "run `hf auth login`", "HF_TOKEN"],
    "refused token": ["the hub refused the token (Invalid user token.)", "`hf auth login --force`"],
    "no hub": ["the hub could not be reached (ConnectError", "check the connection"],
    "read-only token": ["read-only", "`hf auth login`"],
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_push_to_hub_is_refused_at_the_start(tiny, tmp_path, monkeypatch, kind):
    import huggingface_hub
    import huggingface_hub.constants

    from wuerstchen_lora import recipe

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", kind == "offline")

    class Api:
        def __init__(self, token=None):
            pass

        def whoami(self):
            answer = hub_answer(kind)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(recipe, "load_frozen_models", lambda *a, **k: pytest.fail("models loaded before the hub was checked"))
    out = tmp_path / "out"
    proc = run_script(train_args(tiny, out, extra=["--push_to_hub", "--hub_model_id", "someone/my-lora"]), launcher="inprocess", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: --push_to_hub: ") and "huggingface-cli" not in line
    for needle in REFUSALS[kind] + ["leave --push_to_hub out", "hf upload someone/my-lora"]:
        assert needle in line, line
    assert not (out / LORA_WEIGHTS_NAME).exists()


def test_a_good_login_gets_a_note_and_the_upload_later_command_leaves_local_files_out(trained, tmp_path, monkeypatch):
    import huggingface_hub

    from wuerstchen_lora.config import HubConfig
    from wuerstchen_lora.outputs import hub_login_note, upload_command

    monkeypatch.setattr(huggingface_hub, "HfApi", type("Api", (), {"__init__": lambda self, token=None: None, "whoami": lambda self: hub_answer("good")}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    note = hub_login_note(HubConfig(push_to_hub=True, hub_model_id="my-lora"))
    assert note.startswith("note: --push_to_hub: logged in to the hub as someone;") and "https://huggingface.co/someone/my-lora" in note
    command = upload_command("someone/my-lora", str(trained))
    assert command.startswith(f"hf upload someone/my-lora {trained} ")
    for excluded in ("--exclude 'checkpoint-*'", "--exclude 'embeddings_cache/*'", "--exclude 'logs/*'"):
        assert excluded in command, command
    assert not any(name in command for name in (LORA_WEIGHTS_NAME, "README.md", "args.json", "training_info.json", "validation_grid.png"))
    assert os.path.isdir(trained / "logs") and any(p.startswith("checkpoint-") for p in os.listdir(trained))
