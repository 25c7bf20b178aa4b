"""Every training and inference command shown in the README parses with the scripts' own parsers."""

import re
import shlex
from pathlib import Path

from wuerstchen_lora import flags
from wuerstchen_lora import inference as infer
from wuerstchen_lora import recipe as trainer

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands():
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if re.match(r"\s*(accelerate launch|python3?|torchrun)\b.*(train_wuerstchen_prior_lora|infer)\.py", command):
                commands.append(command.strip())
    return commands


def test_readme_shows_both_scripts():
    commands = readme_commands()
    assert any("train_wuerstchen_prior_lora.py" in c for c in commands)
    assert any("infer.py" in c for c in commands)


def test_every_readme_command_parses(monkeypatch):
    from wuerstchen_lora import warmstart

    monkeypatch.setattr(trainer.os.path, "isdir", lambda p: True)  # resume folders named in the README
    # --init_lora's file is read while the flags are checked: the README's `out` is a run it has not made
    settings = {"r": 8, "lora_alpha": 8.0, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"], "use_dora": False, "use_rslora": False}
    monkeypatch.setattr(warmstart, "read_init_lora", lambda spec, revision=None: ({}, settings))
    for command in readme_commands():
        words = shlex.split(command, comments=True)
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        argv = [w for w in words[script + 1:] if w not in ("&&",)]
        if "&&" in words[script + 1:]:
            argv = words[script + 1:words.index("&&", script)]
        if words[script].endswith("infer.py"):
            infer.parse_args(argv)
        else:
            flags.parse_args(argv)
