"""The training configuration: one frozen dataclass per flag group, built once from the parsed
command line (recipe.build_config) and never changed after.

Field names are the flag names (`--learning_rate` is `optim.learning_rate`), so an error message
that names a flag names a field. Each module receives only the groups it needs: the embedding cache
gets `data` and `cache`, and cannot see `hub`. `args.json` and every checkpoint's
`trainer_state.json` record `to_dict()`; a resume compares it field by field (guard.py).
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    pretrained_prior_model_name_or_path: str
    revision: Optional[str]
    image_encoder: Optional[str]
    pretrained_decoder_model_name_or_path: str


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int
    lora_alpha: float  # resolved: the rank when not given
    lora_dropout: float
    lora_targets: str
    lora_target_modules: tuple  # resolved: the preset's modules when not given
    use_dora: bool
    use_rslora: bool
    init_lora: Optional[str]  # a LoRA file/folder/hub repo to start from (a warm start, not a resume)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: Optional[str]
    dataset_config_name: Optional[str]
    image_column: Optional[str]  # as given; the detected columns are the loaded data's (recipe.LoadedData)
    caption_column: Optional[str]
    max_train_samples: Optional[int]
    cache_dir: Optional[str]
    resolution: int
    center_crop: bool
    random_flip: bool
    aspect_ratio_buckets: bool
    bucket_max_upscale: float
    dataloader_num_workers: int
    repeats: int
    caption_prefix: str
    caption_dropout: float
    shuffle_tags: bool
    keep_tokens: int
    max_bad_images: float
    allow_missing_captions: bool
    noise_offset: float  # the per-sample noise is drawn with the data (data.sample_noise)
    caption_extension: str = ".txt"  # a folder's caption files (.txt and .caption are read as well)
    caption_from: Optional[str] = None  # "folder" or "filename": a folder's captions from names
    no_folder_repeats: bool = False  # kohya's N_name folders read as plain folders
    max_image_pixels: Optional[int] = None  # PIL's decompression-bomb limit (None: PIL's own; 0: none)


@dataclasses.dataclass(frozen=True)
class SubjectConfig:
    """DreamBooth-style subject training, in the names diffusers' DreamBooth scripts use."""

    instance_data_dir: Optional[str]
    instance_prompt: Optional[str]
    with_prior_preservation: bool
    class_prompt: Optional[str]
    class_data_dir: Optional[str]
    num_class_images: int
    prior_loss_weight: float


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    cache_embeddings: bool
    embeddings_cache_dir: Optional[str]
    cache_batch_size: int


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: Optional[int]
    num_train_epochs: int
    learning_rate: float
    adam_weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: int
    mixed_precision: str  # resolved: the flag, else accelerate's setting, else the device's default
    gradient_checkpointing: float
    allow_tf32: bool
    max_nonfinite_steps: int
    optimizer: str  # resolved: --use_8bit_adam folds into it
    loss_weighting: str
    snr_gamma: float
    use_ema: bool
    ema_decay: float
    torch_compile: Optional[str]  # resolved: an accelerate config's dynamo_backend folds into it
    torch_compile_backend: str
    prior_dropout: Optional[float]


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    output_dir: str
    checkpointing_steps: int
    checkpoints_total_limit: Optional[int]
    resume_from_checkpoint: Optional[str]
    discard_newer_checkpoints: bool
    report_to: str
    tracker_project_name: str
    logging_dir: str
    logging_steps: int
    overwrite_output_dir: bool = False  # a new run in a folder holding an earlier one: delete that run's files first


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    validation_prompts: Optional[tuple]
    validation_steps: Optional[int]  # resolved: 100 unless --validation_epochs is given
    validation_epochs: Optional[int]  # converted to steps once the epoch length is known (recipe.setup_loop)
    validation_split: float
    validation_dataset: Optional[str]


@dataclasses.dataclass(frozen=True)
class HubConfig:
    push_to_hub: bool
    hub_model_id: Optional[str]  # resolved: the output folder's name when pushing without one
    # Used for the upload only: left out of to_dict(), so args.json, checkpoints and trackers never see it.
    hub_token: Optional[str] = dataclasses.field(default=None, repr=False, metadata={"record": False})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int  # data order, augmentation, noise, timesteps, dropout and the LoRA initialisation
    model: ModelConfig
    lora: LoraSettings
    data: DataConfig
    subject: SubjectConfig
    cache: CacheConfig
    optim: OptimConfig
    output: OutputConfig
    validation: ValidationConfig
    hub: HubConfig

    def to_dict(self):
        """{group: {field: value}} (and "seed"), JSON-ready: tuples become lists; secrets left out."""
        out = {"seed": self.seed}
        for name in GROUPS:
            group = getattr(self, name)
            out[name] = {f.name: _jsonable(getattr(group, f.name)) for f in dataclasses.fields(group) if f.metadata.get("record", True)}
        return out

    def flat(self):
        """{field: value} over every group: field names are unique across groups (tested)."""
        return flatten_record(self.to_dict())


GROUPS = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name != "seed"}


def group_fields(group):
    return [f.name for f in dataclasses.fields(GROUPS[group])]


def from_values(values):
    """A TrainConfig from a flat {field: value} mapping holding every field (extra keys are an error:
    a flag that belongs to no group would be silently dropped)."""
    values = dict(values)
    groups = {}
    for name, cls in GROUPS.items():
        fields = dataclasses.fields(cls)
        groups[name] = cls(**{f.name: _frozen(values.pop(f.name) if f.default is dataclasses.MISSING else values.pop(f.name, f.default)) for f in fields})
    seed = values.pop("seed")
    if values:
        raise TypeError(f"settings that belong to no configuration group: {sorted(values)}")
    return TrainConfig(seed=seed, **groups)


def flatten_record(record):
    """A recorded configuration as {field: value}: the grouped form this version writes, or the flat
    form earlier versions wrote (read as it is)."""
    if not isinstance(record, dict):
        return {}
    if "optim" in record and isinstance(record["optim"], dict):
        out = {}
        for key, value in record.items():
            out.update(value if isinstance(value, dict) else {key: value})
        return out
    return dict(record)


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def with_changes(cfg, **changes):
    """A new TrainConfig with some fields (by flag name) replaced; `cfg` itself stays as it is."""
    unknown = set(changes) - set(cfg.flat())
    if unknown:
        raise TypeError(f"no such configuration fields: {sorted(unknown)}")
    return from_values({**cfg.flat(), **changes})
