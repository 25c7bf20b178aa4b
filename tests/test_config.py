"""The typed configuration: every flag in exactly one frozen group, recorded whole, compared field by field."""

import dataclasses
import json

import pytest

from wuerstchen_lora import flags
from wuerstchen_lora.config import (
    GROUPS,
    TrainConfig,
    flatten_record,
    from_values,
    with_changes,
)

# Flags read once and folded into others: --use_8bit_adam into --optimizer, --local_rank dropped.
FOLDED = {"use_8bit_adam", "local_rank"}


def all_flags():
    parser = flags.ArgumentParser()
    for add in (flags.add_model_flags, flags.add_data_flags, flags.add_optimisation_flags, flags.add_output_flags):
        add(parser)
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_every_flag_is_one_field_of_one_group():
    fields = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)] + ["seed"]
    assert len(fields) == len(set(fields)), "a field name in two groups"
    assert set(fields) == all_flags() - FOLDED


def test_config_is_frozen_and_records_itself(tmp_path):
    cfg = flags.parse_args(["--dataset", "d", "--output_dir", str(tmp_path / "o"), "--lora_target_modules", "to_q,to_k", "--validation_prompts", "a", "b"])
    assert isinstance(cfg, TrainConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None
    assert cfg.lora.lora_target_modules == ("to_q", "to_k") and cfg.lora.lora_alpha == 8.0  # resolved once, at build
    record = json.loads(json.dumps(cfg.to_dict()))
    assert from_values(flatten_record(record)) == cfg  # what args.json and checkpoints hold is the whole config
    changed = with_changes(cfg, learning_rate=0.5)
    assert changed.optim.learning_rate == 0.5 and cfg.optim.learning_rate == 1e-4
    with pytest.raises(TypeError, match="no such configuration fields"):
        with_changes(cfg, learnin_rate=0.5)


def test_each_module_gets_its_slice():
    """The cache and the data pipeline never see the whole config (so not the hub settings)."""
    import inspect

    from wuerstchen_lora import cache, validation

    assert "hub" not in inspect.signature(cache.build_cache).parameters
    for name in ("build_cache", "cache_key"):
        assert "cfg" not in inspect.signature(getattr(cache, name)).parameters, name
    assert "cfg" not in inspect.signature(validation.HeldOutLoss).parameters


def test_flat_records_of_earlier_versions_still_read():
    old = {"learning_rate": 1e-3, "rank": 4}
    assert flatten_record(old) == old
