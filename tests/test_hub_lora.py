"""Hub LoRAs (`infer.py --checkpoint user/repo`, the trainer's --init_lora from a repo). Never the network:
repos are laid out in a local hub cache (blobs, snapshots/<commit>, refs) that huggingface_hub reads
offline through its real code path, or hf_hub_download is replaced for the online-only answers."""

import hashlib
import os
import shutil
import types

import numpy as np
import pytest
from conftest import INFER, run_script
from PIL import Image

from wuerstchen_lora import hub
from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, TRAINING_INFO_NAME, UserError
from wuerstchen_lora.warmstart import read_init_lora

PROMPT = "a red circle"
REPO = "someone/wuerstchen-lora"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache in tmp_path; returns publish(repo, {name: source file}, ref, commit)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for the scripts run in a subprocess

    def publish(repo, files, ref="main", commit=None, missing=()):
        root = cache / ("models--" + repo.replace("/", "--"))
        commit = commit or hashlib.sha1(f"{repo}{ref}{sorted(files)}".encode()).hexdigest()
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (root / "blobs").mkdir(exist_ok=True)
        for name, source in files.items():
            data = open(source, "rb").read()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / name)  # the hub cache links snapshots to blobs
        for name in missing:  # what the hub cache records after an online look-up found no such file
            (root / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
            (root / ".no_exist" / commit / name).touch()
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
        return commit
    return publish


def publish_run(publish, out, repo=REPO, **kwargs):
    return publish(repo, {LORA_WEIGHTS_NAME: out / LORA_WEIGHTS_NAME, TRAINING_INFO_NAME: out / TRAINING_INFO_NAME}, **kwargs)


def image(checkpoint, tmp_path, name, *extra):
    out = tmp_path / f"{name}.png"
    assert infer.main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--height", "128", "--width", "128",
                       "--device", "cpu", "--output", str(out), *extra]) == 0
    return np.asarray(Image.open(out))


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_hub_repo_gives_the_same_image_as_the_local_folder(trained, hub_cache, tmp_path, capsys):
    publish_run(hub_cache, trained)
    # no --prior_model / --decoder_model: both come from the repo's training_info.json, as for a folder
    assert np.array_equal(image(REPO, tmp_path, "hub"), image(trained, tmp_path, "local"))
    assert f"note: --checkpoint {REPO}: the hub repo's {LORA_WEIGHTS_NAME}" in capsys.readouterr().err


def test_revision_is_passed_through(trained, hub_cache):
    old = (trained / "checkpoint-15" / LORA_WEIGHTS_NAME).read_bytes()
    new = (trained / LORA_WEIGHTS_NAME).read_bytes()
    assert old != new
    hub_cache(REPO, {LORA_WEIGHTS_NAME: trained / "checkpoint-15" / LORA_WEIGHTS_NAME}, ref="main")
    commit = publish_run(hub_cache, trained, ref="v2")
    args = infer.parse_args(["--checkpoint", REPO, "--revision", "v2", "--prompt", PROMPT])
    assert args.revision == "v2"
    fetched = infer.resolve_lora_path(args.checkpoint, args.revision)
    assert open(fetched, "rb").read() == new
    assert os.path.isfile(os.path.join(os.path.dirname(fetched), TRAINING_INFO_NAME))  # the info of that same commit
    assert open(infer.resolve_lora_path(REPO, commit), "rb").read() == new  # a commit hash works too
    assert open(infer.resolve_lora_path(REPO), "rb").read() == old  # main


def test_revision_reaches_every_download(monkeypatch, tmp_path):
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / filename)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert hub.fetch_lora(REPO, revision="v2") == str(tmp_path / LORA_WEIGHTS_NAME)
    assert calls == [(REPO, LORA_WEIGHTS_NAME, "v2"), (REPO, TRAINING_INFO_NAME, "v2")]


def test_offline_and_not_cached_is_one_error_line(hub_cache, tmp_path):
    proc = run_script([INFER, "--checkpoint", REPO, "--prompt", PROMPT, "--output", tmp_path / "x.png"], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: --checkpoint {REPO}: no such local file or folder, and the hub repo is not in the local hub cache")
    assert "HF_HUB_OFFLINE=1" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_repo_without_the_lora_file_is_one_error_line(hub_cache, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("a model card\n")
    hub_cache(REPO, {"README.md": readme}, missing=[LORA_WEIGHTS_NAME])
    assert infer.main(["--checkpoint", REPO, "--prompt", PROMPT, "--output", str(tmp_path / "x.png")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: --checkpoint {REPO}: the hub repo has no {LORA_WEIGHTS_NAME}; give a repo or folder "
                     "that holds a LoRA trained by this tool (or the .safetensors file itself)"]


def hub_http_error(name):
    from huggingface_hub import errors

    cls = getattr(errors, name, None) or errors.EntryNotFoundError
    return cls(f"404 Client Error: {name}", response=types.SimpleNamespace(headers={}, request=None))


@pytest.mark.parametrize("error, message", [
    ("RepositoryNotFoundError", "no such local file or folder, and no such hub repo"),
    ("RevisionNotFoundError", "the hub repo has no branch, tag or commit v9"),
    ("RemoteEntryNotFoundError", f"the hub repo has no {LORA_WEIGHTS_NAME}"),
    ("GatedRepoError", "the hub repo is gated"),
])
def test_online_answers_are_one_error_line(monkeypatch, tmp_path, capsys, error, message):
    def fake_download(*args, **kwargs):
        raise hub_http_error(error)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert infer.main(["--checkpoint", REPO, "--revision", "v9", "--prompt", PROMPT, "--output", str(tmp_path / "x.png")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: --checkpoint {REPO} --revision v9: {message}"), lines


def test_a_local_path_wins_over_the_hub(trained, hub_cache, tmp_path, monkeypatch):
    hub_cache(REPO, {LORA_WEIGHTS_NAME: trained / "checkpoint-15" / LORA_WEIGHTS_NAME})
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / REPO, ignore=shutil.ignore_patterns("checkpoint-*", "embeddings_cache", "logs", "validation"))
    assert infer.resolve_lora_path(REPO) == os.path.join(REPO, LORA_WEIGHTS_NAME)


@pytest.mark.parametrize("spec", ["missing-folder", "no/such/folder", "./someone/repo", "someone/lora.safetensors"])
def test_neither_a_path_nor_a_repo_id_is_no_such_file(hub_cache, spec):
    with pytest.raises(UserError, match=f"--checkpoint {spec}: no such file or folder"):
        infer.resolve_lora_path(spec)


def test_init_lora_from_a_hub_repo(trained, hub_cache):
    publish_run(hub_cache, trained)
    state_dict, settings = read_init_lora(REPO)
    local_state, local_settings = read_init_lora(trained)
    assert settings == local_settings and sorted(state_dict) == sorted(local_state)
    with pytest.raises(UserError, match=f"--init_lora {REPO} --revision nope: no such local file or folder, and the hub repo is not in the local hub cache"):
        read_init_lora(REPO, revision="nope")


def test_hub_out_of_reach_is_one_error_line(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    def fake_download(*args, **kwargs):  # what hf_hub_download raises online when the connection fails
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert infer.main(["--checkpoint", REPO, "--prompt", PROMPT, "--output", str(tmp_path / "x.png")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "the hub could not be reached nor is the repo in the local hub cache" in lines[0], lines
