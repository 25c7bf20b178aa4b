"""Inputs at their extremes (issue 23): every number of both scripts at the edge of its type or of the
machine, and every input of infer.py, refused before anything loads with one `error:` line that
names the problem and the fix, exit status 2, no traceback, and nothing written before touched.

Fast on purpose: the scripts run in this process (the argument checks come before any model loads);
one subprocess shows the real command line prints no traceback."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import INFER, ROOT, run_script, script_env, train_args
from safetensors.torch import save_file

from wuerstchen_lora import flags
from wuerstchen_lora import inference as infer
from wuerstchen_lora.models import LORA_WEIGHTS_NAME, TRAINING_INFO_NAME

EARLIER = b"written before: must stay"
BIG = str(10**20)  # past 2**63 - 1


def one_error(proc):
    """The single `error:` line of a refused run (status 2, no traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Training: every numeric flag within what its consumer takes; sizes that cannot fit refused

TRAIN_CASES = {
    "batch past int64 (islice)": (["--train_batch_size", BIG], ["--train_batch_size must be at most 9223372036854775807"]),
    "batch that cannot fit": (["--train_batch_size", "1e15"], ["--train_batch_size 1000000000000000 at --resolution 64: one micro-batch", "use --train_batch_size"]),
    "accumulation past int64": (["--gradient_accumulation_steps", BIG], ["--gradient_accumulation_steps must be at most"]),
    "cache batch that cannot fit": (["--cache_batch_size", "100000000000"], ["--cache_batch_size 100000000000 at --resolution 64: one encoding batch", "use --cache_batch_size"]),
    "repeats that cannot fit": (["--repeats", "1e12"], ["--repeats 1000000000000: an epoch of", "use --repeats", "--num_train_epochs"]),
    "resolution that cannot fit": (["--resolution", "1e6"], ["--resolution 1000000: one training sample", "use --resolution 768"]),
    "workers that cannot fit": (["--dataloader_num_workers", "1e6"], ["--dataloader_num_workers 1000000: that many worker processes", "use --dataloader_num_workers"]),
    "class examples that cannot fit": (["--with_prior_preservation", "--class_prompt", "a dog", "--num_class_images", "1e13"],
                                       ["--num_class_images 10000000000000", "use --num_class_images"]),
    "steps past int64": (["--max_train_steps", BIG], ["--max_train_steps must be at most"]),
    "huge negative": (["--lr_warmup_steps", "-" + BIG], ["--lr_warmup_steps must be 0 or more (got -1.00e+20)"]),
    "rank past int64": (["--rank", "1e400"], ["--rank must be at most"]),
    "seed not whole": (["--seed", "1.5"], ["--seed must be a whole number (got 1.5)"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_numbers_at_their_extremes(tiny, tmp_path, case):
    extra, needles = TRAIN_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(EARLIER)
    line = one_error(run_script(train_args(tiny, out, extra=extra), launcher="inprocess", check=False))
    for needle in needles:
        assert needle in line, line
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_bytes() == EARLIER


def test_repeats_checked_against_the_real_row_count(tiny, tmp_path, monkeypatch):
    """Flag time knows only that a dataset has a row; once the rows are counted (8 here) the epoch's
    order is checked again, before the sampler allocates it. The memory is pinned to 1 GiB."""
    monkeypatch.setattr(flags, "machine_memory", lambda: 2**30)
    out = tmp_path / "out"
    line = one_error(run_script(train_args(tiny, out, extra=["--repeats", "10000000"]), launcher="inprocess", check=False))
    assert line.startswith("error: --repeats 10000000: an epoch of 8 rows x 10000000 repeats = 80,000,000 samples"), line
    assert "more than the 1.0 GiB of this machine's memory; use --repeats 2796202 or less" in line
    assert not (out / LORA_WEIGHTS_NAME).exists() and not (out / "args.json").exists()


@pytest.mark.parametrize("seed, used", [(str(2**64), 0), ("-1", 2**63 - 1), (str(2**63), 0), ("1e3", 1000), (str(2**63 - 1), 2**63 - 1)])
def test_seed_outside_63_bits_is_reduced_with_a_note(tiny, tmp_path, capsys, seed, used):
    argv = [str(a) for a in train_args(tiny, tmp_path / "out", extra=["--seed", seed])[1:]]
    assert flags.parse_args(argv).seed == used
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --seed")]
    if str(used) == seed or seed == "1e3":
        assert notes == []
    else:
        assert notes == [f"note: --seed {seed} is outside [0, 2**63), the seeds torch, numpy and accelerate all take; using {used} (the seed modulo 2**63)"]


def test_whole_numbers_in_exponent_notation():
    parse = flags.number(int, 0, low_open=True)
    assert parse("1e9") == 10**9 and parse("2.5e3") == 2500 and parse(str(2**63 - 1)) == 2**63 - 1
    for text in ("1.5", "1e-3", "nan", "inf", "1e5000"):
        with pytest.raises(flags.argparse.ArgumentTypeError, match="must be a whole number"):
            parse(text)


# ----------------------------------------------------------------------------------------------
# infer.py: every input checked before any model loads


def lora_tensors(rank=4, width=32):
    """A LoRA for the tiny prior (width 32), in the layout training writes."""
    out = {}
    for block in (2, 5):
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"prior.blocks.{block}.attention.{name}"
            out[f"{key}.lora_A.weight"] = torch.zeros(rank, width)
            out[f"{key}.lora_B.weight"] = torch.zeros(width, rank)
    return out


def damaged(tensors):
    """The structural faults of a LoRA file, each as the tensors it holds."""
    b_key = next(k for k in tensors if "lora_B" in k)
    return {
        "only lora_A": ({k: v for k, v in tensors.items() if "lora_A" in k}, ["is incomplete: 8 of 8 layers have no lora_B", "lora_B.weight is missing", "download it again"]),
        "only lora_B": ({k: v for k, v in tensors.items() if "lora_B" in k}, ["is incomplete: 8 of 8 layers have no lora_A"]),
        "one lora_B missing": ({k: v for k, v in tensors.items() if k != b_key}, ["1 of 8 layers have no lora_B", b_key]),
        "ranks disagree": ({**tensors, b_key: torch.zeros(32, 3)}, ["disagree on the rank", "[4, 32]", "[32, 3]"]),
        "unknown layer": ({**tensors, "prior.text_mapper.lora_A.weight": torch.zeros(4, 8), "prior.text_mapper.lora_B.weight": torch.zeros(8, 4)},
                          ["1 of 9 adapted layers are not layers of the Wuerstchen prior (e.g. prior.text_mapper)"]),
        "not a LoRA tensor": ({**tensors, "prior.blocks.2.attention.to_q.weight": torch.zeros(32, 32)},
                              ["prior.blocks.2.attention.to_q.weight is not a LoRA tensor"]),
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    save_file(lora_tensors(), str(folder / LORA_WEIGHTS_NAME))
    return folder


def run_infer(*argv):
    return run_script([INFER, *argv], launcher="inprocess", check=False)


def infer_refused(argv, needles, output):
    """infer.py with `argv` is refused with one error line holding `needles`; `output`, written
    before, is untouched and no image appears beside it."""
    output.write_bytes(EARLIER)
    line = one_error(run_infer(*argv, "--output", str(output)))
    for needle in needles:
        assert needle in line, line
    assert output.read_bytes() == EARLIER
    assert [p.name for p in output.parent.iterdir() if p.suffix == ".png"] == [output.name]
    return line


@pytest.mark.parametrize("case", sorted(damaged(lora_tensors())))
def test_infer_lora_file_structure(tmp_path, case):
    tensors, needles = damaged(lora_tensors())[case]
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / LORA_WEIGHTS_NAME))
    before = (folder / LORA_WEIGHTS_NAME).read_bytes()
    infer_refused(["--checkpoint", str(folder), "--prompt", "x"], needles, tmp_path / "earlier.png")
    assert (folder / LORA_WEIGHTS_NAME).read_bytes() == before


INFO_CASES = {
    "corrupt": ('{"base_model": ', ["training_info.json is not readable JSON", "move it away"]),
    "a list": ("[1, 2]", ["training_info.json holds a JSON list, not the object of settings training writes"]),
    "not text": (b"\xff\xfe\x00garbage", ["training_info.json is not readable JSON"]),
    "a number for a model": ('{"base_model": 3}', ["training_info.json: base_model is 3, not a model name"]),
}


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_infer_training_info(lora_dir, tmp_path, case):
    text, needles = INFO_CASES[case]
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / LORA_WEIGHTS_NAME).write_bytes((lora_dir / LORA_WEIGHTS_NAME).read_bytes())
    info = folder / TRAINING_INFO_NAME
    info.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = info.read_bytes()
    infer_refused(["--checkpoint", str(folder), "--prompt", "x"], needles, tmp_path / "earlier.png")
    assert info.read_bytes() == before


INFER_CASES = {
    "unknown device": (["--device", "gpu0"], ["--device gpu0: not a device name torch knows; use cpu, cuda, cuda:N or mps"]),
    "a device that is no device": (["--device", "meta"], ["--device meta: torch cannot generate on a meta device here"]),
    "a GPU index past the last": (["--device", "cuda:99"], ["--device cuda:99:"]),
    "images that cannot fit": (["--num_images", "1e9"], ["--num_images 1000000000 at 1024x1024: the decoder's batch", "use --num_images", "another --seed"]),
    "images past int64": (["--num_images", BIG], ["--num_images must be at most 9223372036854775807"]),
    "a side that cannot fit": (["--height", "1e8"], ["--height 100000000 --width 1024: one image needs at least", "use a smaller --height and --width"]),
    "a side past a float": (["--width", str(10**400)], ["--width must be at most"]),
    "decoder steps": (["--decoder_steps", "1e6"], ["--decoder_steps must be in [1, 1000] (got 1000000)"]),
    "lora scale not finite": (["--lora_scale", "nan"], ["--lora_scale must be a finite number (got nan)"]),
    "negative guidance": (["--prior_guidance_scale", "-1e-3"], ["--prior_guidance_scale must be in [0, 1000] (got -0.001)"]),
    "guidance that overflows": (["--decoder_guidance_scale", "1e30"], ["--decoder_guidance_scale must be in [0, 1000] (got 1e+30)"]),
    "lora scale that overflows": (["--lora_scale", "-1e30"], ["--lora_scale must be in [-1000, 1000] (got -1e+30)"]),
    "seed not whole": (["--seed", "0.5"], ["--seed must be a whole number (got 0.5)"]),
    "a flag without its value": (["--num_images"], ["--num_images expected one argument"]),
}


@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_infer_arguments_at_their_extremes(lora_dir, tmp_path, case):
    extra, needles = INFER_CASES[case]
    infer_refused(["--checkpoint", str(lora_dir), "--prompt", "x", *extra], needles, tmp_path / "earlier.png")


def test_infer_cuda_without_a_gpu(lora_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    infer_refused(["--checkpoint", str(lora_dir), "--prompt", "x", "--device", "cuda"],
                  ["--device cuda: no CUDA GPU is visible to torch here", "use --device cpu"], tmp_path / "earlier.png")


def test_infer_seed_outside_63_bits_is_reduced_with_a_note(lora_dir, capsys):
    args = infer.parse_args(["--checkpoint", str(lora_dir), "--prompt", "x", "--device", "cpu", "--seed", str(2**64 + 5)])
    assert args.seed == 5
    assert "note: --seed 18446744073709551621 is outside [0, 2**63)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["parent", "grandparent"])
def test_infer_output_under_a_file(lora_dir, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(EARLIER)
    output = blocker / "image.png" if where == "parent" else blocker / "sub" / "image.png"
    line = one_error(run_infer("--checkpoint", str(lora_dir), "--prompt", "x", "--output", str(output)))
    assert f"--output {output}: {blocker} is a file, not a folder" in line and "choose another --output" in line
    assert blocker.read_bytes() == EARLIER


def test_infer_output_in_a_read_only_folder(lora_dir, tmp_path, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    (folder / "earlier.png").write_bytes(EARLIER)
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: fail the writes into the folder as a read-only mount would
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", path))
                            if str(path).startswith(str(folder)) else real_open(path, *a, **k))
    try:
        line = one_error(run_infer("--checkpoint", str(lora_dir), "--prompt", "x", "--output", str(folder / "new.png")))
    finally:
        folder.chmod(0o755)
    assert f"cannot write in {folder} (Permission denied); choose a folder you can write to" in line
    assert sorted(p.name for p in folder.iterdir()) == ["earlier.png"] and (folder / "earlier.png").read_bytes() == EARLIER


def test_infer_command_line_prints_no_traceback(tmp_path):
    """The real command line, once: a LoRA file holding only lora_A tensors (an IndexError before)."""
    tensors, _ = damaged(lora_tensors())["only lora_A"]
    save_file(tensors, str(tmp_path / LORA_WEIGHTS_NAME))
    proc = subprocess.run([sys.executable, INFER, "--checkpoint", str(tmp_path), "--prompt", "x", "--output", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=script_env(), cwd=str(ROOT), timeout=300)
    assert "is incomplete: 8 of 8 layers have no lora_B" in one_error(proc)
    assert not (tmp_path / "x.png").exists()
