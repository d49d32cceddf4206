"""The run's configuration: parsed once from the command line into a frozen RunConfig of typed sections.

argv -> flags.parse (plain values) -> hf_flags.translate (HF's spellings, a pure function) ->
deepspeed_config.merge_json (a --deepspeed JSON read in once) -> RunConfig. Each section checks its own
values in __post_init__ and RunConfig the ones that span sections; every contradiction is a ConfigError
before anything starts. Nothing changes a RunConfig afterwards (the dataclasses are frozen): derived things
(the DeepSpeed JSON, the schedule, the intervals) are computed from it, and each component is handed the
section it needs.
"""
import dataclasses
import json
import types
from dataclasses import dataclass
from pathlib import Path

from fastlm.tokenizer import check_trained_vocab_size
from fastlm.train import deepspeed_config, flags, hf_flags, outputs
from fastlm.train.errors import ConfigError, fail
from fastlm.train.model import model_type_task
from fastlm.train.sources import Source, eval_sources, train_sources

_frozen = dataclass(frozen=True)
_EMPTY = types.MappingProxyType({})


def _at_least(section, minimum, *names, strict=False):
    for name in names:
        value = getattr(section, name)
        if value is not None and (value <= minimum if strict else value < minimum):
            raise ConfigError(f"--{name} must be {'>' if strict else '>='} {minimum}, got {value}")


@_frozen
class ModelConfig:
    """Which model: fine-tuned from --model_name_or_path, or built from scratch (a preset, a config, a type)."""
    task: str  # "clm" or "mlm" (--task auto is resolved from the model's type)
    model_name_or_path: str = None
    config_name: str = None
    model_type: str = None
    config_overrides: str = None
    trust_remote_code: bool = False
    model_revision: str = "main"
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: types.MappingProxyType = dataclasses.field(default_factory=lambda: _EMPTY)
    torch_compile: bool = False
    torch_compile_backend: str = None
    torch_compile_mode: str = None

    def __post_init__(self):
        if not (self.model_name_or_path or self.config_name or self.model_type):
            raise ConfigError("give a model: --model_name_or_path (fine-tune), or --config_name / --model_type "
                              "(from scratch)")
        if self.model_type and self.config_name:
            raise ConfigError("give --config_name or --model_type, not both")
        if self.model_type and self.model_name_or_path:
            raise ConfigError("--model_type builds a new model: it does not go with --model_name_or_path")
        if self.config_overrides and self.model_name_or_path:
            raise ConfigError("--config_overrides changes a config built from scratch; it cannot reshape "
                              "--model_name_or_path's weights")


@_frozen
class DataConfig:
    """What to train and evaluate on (token stores, or text prepared into the cache), and how it is packed."""
    train_stores: tuple = ()
    eval_stores: tuple = ()
    train_files: tuple = ()
    validation_files: tuple = ()
    dataset_name: str = None
    dataset_config_name: str = None
    tokenizer: str = None  # what prepares text: --tokenizer_name, else --model_name_or_path (None: trained)
    train_tokenizer: bool = False
    vocab_size: int = 8192
    cache_dir: str = None
    overwrite_cache: bool = False
    preprocessing_num_workers: int = None
    doc_boundary: str = "line"
    keep_linebreaks: bool = True
    skip_blank_lines: bool = False
    line_by_line: bool = False
    validation_split_percentage: float = 5.0
    max_train_samples: int = None
    max_eval_samples: int = None
    block_size: int = None  # None: run_clm/run_mlm's default, resolved once the tokenizer is known
    packing: str = "blocks"
    separator: str = "none"
    mlm_probability: float = 0.15
    eval_stride: int = None
    seed: int = 42  # of the sample order and the MLM masks

    def __post_init__(self):
        stores = bool(self.train_stores or self.eval_stores)
        files = bool(self.train_files or self.validation_files or self.dataset_name)
        if not (stores or files):
            raise ConfigError("give exactly one training source: --train_store, or --train_file / --dataset_name")
        if stores and files:
            raise ConfigError("give --train_store/--eval_store or --train_file/--validation_file/--dataset_name, not both")
        if self.train_files and self.dataset_name:
            raise ConfigError("give --train_file or --dataset_name, not both")
        if stores and self.train_tokenizer:
            raise ConfigError("--train_tokenizer goes with --train_file/--dataset_name; with --train_store use --eval_store")
        if self.max_train_samples and len(self.train_stores or self.train_files) > 1:
            raise ConfigError("--max_train_samples takes the first blocks of one training source; a mixture blends "
                              "several (shorten the run with --max_steps)")
        if files and not (self.train_tokenizer or self.tokenizer):
            raise ConfigError("preparing text needs a tokenizer: --tokenizer_name, --model_name_or_path "
                              "or --train_tokenizer")
        if self.train_tokenizer and not self.train_files and not self.dataset_name:
            raise ConfigError("--train_tokenizer trains on the training text: give --train_file or --dataset_name")
        if self.train_tokenizer:
            check_trained_vocab_size(self.vocab_size, "--vocab_size", error=ConfigError)
        _at_least(self, 1, "block_size", "max_train_samples", "max_eval_samples", "preprocessing_num_workers")
        if not 0 <= self.validation_split_percentage < 100:
            raise ConfigError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}")
        if self.line_by_line and (self.packing != "blocks" or self.eval_stride):
            raise ConfigError("--line_by_line puts one line in each block: it does not go with --packing documents "
                              "or --eval_stride")
        if self.eval_stride is not None and not 1 <= self.eval_stride <= (self.block_size or self.eval_stride):
            raise ConfigError(f"--eval_stride must be in [1, block_size={self.block_size}], got {self.eval_stride}")

    @property
    def keep_blank(self):
        """run_clm/run_mlm tokenize whitespace-only rows like any other; run_mlm --line_by_line drops them."""
        return not (self.skip_blank_lines or self.line_by_line)

    @property
    def given_stores(self):
        return bool(self.train_stores or self.eval_stores)


@_frozen
class OptimConfig:
    """The optimizer, its schedule, the batch and the precision (the DeepSpeed JSON is derived from these)."""
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    train_batch_size: int = None  # None: micro batch x accumulation x ranks
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    optim: str = "adamw"  # or "muon" (fastlm.train.muon)
    muon_lr: float = None  # None: learning_rate
    muon_momentum: float = 0.95
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: types.MappingProxyType = dataclasses.field(default_factory=lambda: _EMPTY)
    warmup_steps: float = 0  # below 1: a fraction of the run
    num_train_epochs: float = 3.0
    max_steps: int = 0  # 0: train by epochs
    zero_stage: int = 0
    precision: str = "fp32"  # resolved: bf16, fp16 or fp32
    deepspeed: str = None  # the --deepspeed JSON's path
    deepspeed_json: str = None  # its text, read once

    def __post_init__(self):
        _at_least(self, 0, "num_train_epochs", strict=True)
        _at_least(self, 0, "warmup_steps")
        _at_least(self, 0, "muon_lr", strict=True)
        if self.optim == "muon":  # (AdamW's is checked in its DeepSpeed "optimizer" entry)
            _at_least(self, 0, "learning_rate", strict=True)
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"--muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.optim == "muon" and self.deepspeed_json and "optimizer" in json.loads(self.deepspeed_json):
            raise ConfigError(f"--optim muon builds the optimizer itself: remove the \"optimizer\" entry from "
                              f"--deepspeed {self.deepspeed}")

    def flag_values(self):
        """The section as flag name -> value (what deepspeed_config builds the DeepSpeed JSON from)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@_frozen
class CheckpointConfig:
    """Where a run writes (output_dir), when it saves checkpoints (output_dir/checkpoint-N), what it resumes from."""
    output_dir: Path = Path("runs/fastlm")
    overwrite_output_dir: bool = False
    save_strategy: str = "no"
    save_steps: float = 0
    save_total_limit: int = None
    resume: bool = False
    resume_from_checkpoint: str = None

    def __post_init__(self):
        _at_least(self, 0, "save_steps")
        _at_least(self, 1, "save_total_limit")
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output_dir {out} is a file; give a directory (it is created if missing)")
        if self.resume:
            if self.overwrite_output_dir:
                raise ConfigError("--overwrite_output_dir deletes the checkpoints that --resume would continue from; "
                                  "give one of them")
            self.resume_point()  # a one-line error when there is none

    def holds_checkpoints(self):
        return bool(outputs.list_checkpoints(self.output_dir))

    def resume_point(self):
        """The checkpoint-N directory that --resume / --resume_from_checkpoint continue from. PATH may be one
        checkpoint (holding DeepSpeed's `latest` file) or an output_dir (its newest checkpoint-N)."""
        given = self.resume_from_checkpoint
        bare = not given or given.lower() in hf_flags.TRUTHY
        path = self.output_dir if bare else Path(given)
        if not bare and (path / "latest").is_file():
            return path
        newest = outputs.newest_checkpoint(path)
        if newest is not None:
            return newest
        if bare:
            raise ConfigError(f"--resume: no checkpoint in {path} (no checkpoint-N directory)")
        raise ConfigError(f"--resume_from_checkpoint {given}: not a checkpoint (no DeepSpeed 'latest' file), nor "
                          "a directory holding checkpoint-N directories")


@_frozen
class EvalConfig:
    """When and how evaluation runs (it always runs at the end when there is an evaluation set)."""
    eval_strategy: str = "no"
    eval_steps: float = 0
    per_device_eval_batch_size: int = 8

    def __post_init__(self):
        _at_least(self, 0, "eval_steps")
        _at_least(self, 1, "per_device_eval_batch_size")


@_frozen
class LoggingConfig:
    """What a run reports, and how often."""
    logging_strategy: str = "steps"
    logging_steps: float = 10
    logging_first_step: bool = False
    report_to: tuple = ()
    run_name: str = None
    project: str = "huggingface"
    logging_dir: str = None
    disable_tqdm: bool = False

    def __post_init__(self):
        _at_least(self, 0, "logging_steps", strict=True)


@_frozen
class RuntimeConfig:
    """The processes: distributed backend and timeouts, data loader workers, seeds, TF32."""
    seed: int = 42
    ddp_timeout: int = 300
    ddp_backend: str = None
    dataloader_num_workers: int = 0
    tf32: bool = None

    def __post_init__(self):
        _at_least(self, 0, "ddp_timeout", strict=True)
        _at_least(self, 0, "dataloader_num_workers")


@_frozen
class RunConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    evaluation: EvalConfig
    logging: LoggingConfig
    runtime: RuntimeConfig
    do_train: bool = True
    do_eval: bool = True

    def __post_init__(self):
        data, task = self.data, self.model.task
        if self.do_train and not (data.train_stores or data.train_files or data.dataset_name):
            raise ConfigError("--do_train needs a training source: --train_store, --train_file or --dataset_name")
        if (self.do_train and not self.checkpoint.resume and self.checkpoint.holds_checkpoints()
                and not self.checkpoint.overwrite_output_dir):
            newest = outputs.newest_checkpoint(self.checkpoint.output_dir)
            raise ConfigError(f"--output_dir {self.checkpoint.output_dir} holds the checkpoints of an earlier run "
                              f"(the newest: {newest.name}): continue it with --resume (or --resume_from_checkpoint), "
                              "or start over with --overwrite_output_dir, which deletes them")
        if task == "clm" and data.block_size is not None and data.block_size < 2:
            raise ConfigError(f"--block_size must be >= 2 for clm (a block of n tokens holds n - 1 next-token "
                              f"targets), got {data.block_size}")
        if task == "mlm" and not 0 < data.mlm_probability < 1:
            raise ConfigError(f"--mlm_probability must be in (0, 1), got {data.mlm_probability}")
        if task != "clm" and data.eval_stride is not None:
            raise ConfigError("--eval_stride is for CLM perplexity; MLM evaluation uses fixed masks")

    @property
    def task(self):
        return self.model.task


def _section(cls, values, **given):
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{name: values[name] for name in names if name in values}, **given)


def from_values(values):
    """A RunConfig from translated flag values (hf_flags.translate, then deepspeed_config.merge_json)."""
    frozen = lambda mapping: types.MappingProxyType(dict(mapping))  # noqa: E731
    train = train_sources(values["train_store"], "--train_store") if values["train_store"] else ()
    data = _section(
        DataConfig, values,
        train_stores=tuple(train), train_files=tuple(train_sources(values["train_file"], "--train_file")
                                                     if values["train_file"] else ()),
        eval_stores=tuple(eval_sources(values["eval_store"], "--eval_store") if values["eval_store"] else ()),
        validation_files=tuple(eval_sources(values["validation_file"], "--validation_file")
                               if values["validation_file"] else ()),
        tokenizer=None if values["train_tokenizer"] else values["tokenizer_name"] or values["model_name_or_path"])
    model = _section(ModelConfig, values, task="clm" if values["task"] == "auto" else values["task"],
                     gradient_checkpointing_kwargs=frozen(values["gradient_checkpointing_kwargs"]))
    if values["task"] == "auto":
        model = dataclasses.replace(model, task=model_type_task(model))
    return RunConfig(
        model=model, data=data,
        optim=_section(OptimConfig, values, lr_scheduler_kwargs=frozen(values["lr_scheduler_kwargs"])),
        checkpoint=_section(CheckpointConfig, values, output_dir=Path(values["output_dir"])),
        evaluation=_section(EvalConfig, values), logging=_section(LoggingConfig, values),
        runtime=_section(RuntimeConfig, values), do_train=values["do_train"], do_eval=values["do_eval"])


def parse(argv, *, device_type="cpu"):
    """The RunConfig of a command line; a bad one exits with status 2 and one line (printed on rank 0)."""
    values, foreign, explicit, _ = flags.parse(argv)
    try:
        values = hf_flags.translate(values, foreign, explicit)
        values = deepspeed_config.merge_json(values, explicit, device_type=device_type)
        return from_values(values)
    except ConfigError as error:
        fail(error, 2)


def as_flags(config):
    """Every flag's value by name, as plain JSON-able data (what trackers record as the run's config)."""
    def plain(value):
        if isinstance(value, types.MappingProxyType):
            return dict(value)
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if isinstance(value, Source):
            return f"{value.name}={value.path}" + (f":{value.weight}" if value.weight is not None else "")
        return str(value) if isinstance(value, Path) else value

    flat = {"do_train": config.do_train, "do_eval": config.do_eval}
    for section in ("model", "data", "optim", "checkpoint", "evaluation", "logging", "runtime"):
        part = getattr(config, section)
        flat.update({f.name: plain(getattr(part, f.name)) for f in dataclasses.fields(part)})
    return flat


def value(config, name):
    """A flag's value wherever its section keeps it (for the checkpoint's record of result-changing flags)."""
    for section in ("model", "data", "optim", "checkpoint", "evaluation", "logging", "runtime"):
        part = getattr(config, section)
        if name in {f.name for f in dataclasses.fields(part)}:
            found = getattr(part, name)
            return dict(found) if isinstance(found, types.MappingProxyType) else found
    raise KeyError(name)

