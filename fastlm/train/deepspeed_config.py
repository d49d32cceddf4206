"""The DeepSpeed config of a run, derived from its optimisation section (config.OptimConfig); a --deepspeed JSON
is merged on top. Reading that JSON into the section's values happens once, while the configuration is built
(merge_json); build() derives the dict DeepSpeed takes and never writes anything back.
"""
import copy
import json
from pathlib import Path

import torch
from deepspeed.runtime.config import DeepSpeedConfig

from fastlm.train.errors import ConfigError, warn

# Command-line flag -> its place in the DeepSpeed config.
_CONFIG_PATHS = {
    "per_device_train_batch_size": ("train_micro_batch_size_per_gpu",),
    "gradient_accumulation_steps": ("gradient_accumulation_steps",),
    "train_batch_size": ("train_batch_size",),
    "max_grad_norm": ("gradient_clipping",),
    "zero_stage": ("zero_optimization", "stage"),
    "learning_rate": ("optimizer", "params", "lr"),
    "weight_decay": ("optimizer", "params", "weight_decay"),
}


def _get(config, path):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif value != "auto":  # HF's convention: "auto" means "take the command line's value"
            base[key] = value
    return base


def _base(values, *, precision, world_size, device_type):
    cpu = device_type == "cpu"
    return {
        "train_micro_batch_size_per_gpu": values["per_device_train_batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation_steps"],
        "train_batch_size": values["train_batch_size"]
        or values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] * world_size,
        "gradient_clipping": values["max_grad_norm"],
        # ZeRO-3 refuses Muon with reduce-scatter: it orthogonalises each matrix whole, after an all-reduce.
        "zero_optimization": {"stage": values["zero_stage"],
                              **({"reduce_scatter": False} if values["optim"] == "muon" and values["zero_stage"] == 3
                                 else {})},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # --optim muon: the runner hands deepspeed.initialize its own optimizer (fastlm.train.muon).
        **({} if values["optim"] == "muon" else {"optimizer": {"type": "AdamW", "params": {
            "lr": values["learning_rate"], "betas": [values["adam_beta1"], values["adam_beta2"]],
            "eps": values["adam_epsilon"], "weight_decay": values["weight_decay"],
            # torch's AdamW on CPU: DeepSpeed's FusedAdam would JIT-compile a CUDA/C++ op first. Its fused
            # kernel (Trainer's default, adamw_torch_fused): the per-tensor loop torch picks on CPU otherwise
            # took ~4% of a tiny model's step.
            **({"torch_adam": True, "fused": True} if cpu else {})}}}),
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }


def _read_user_json(path):
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--deepspeed {path}: cannot read a JSON config ({error})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed {path}: a DeepSpeed config is a JSON object ({{...}}), "
                          f"this file holds a {type(user).__name__}")
    return user


def _merged(values, user, *, precision, world_size, device_type):
    config = _base(values, precision=precision, world_size=world_size, device_type=device_type)
    if user is None:
        return config
    if "bf16" in user or "fp16" in user:
        config.pop("bf16"), config.pop("fp16")
    config = _merge(config, copy.deepcopy(user))
    if values["train_batch_size"] is None and _get(user, ("train_batch_size",)) in (None, "auto"):
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                      * config["gradient_accumulation_steps"] * world_size)
    return config


def merge_json(values, explicit, *, device_type):
    """The flag values with --deepspeed's JSON read in (a new dict): the file fills in what the user did not
    set, "auto" takes the flag, a file value that contradicts a flag the user set is a ConfigError; the
    precision is resolved ("auto": by device). The file's text is kept (`deepspeed_json`) for build()."""
    values = dict(values, precision=resolve_precision(values["precision"], device_type), deepspeed_json=None)
    if not values["deepspeed"]:
        return values
    user = _read_user_json(values["deepspeed"])
    for name, key_path in _CONFIG_PATHS.items():
        mine, theirs = values[name], _get(user, key_path)
        if name in explicit and theirs not in (None, "auto") and theirs != mine:
            raise ConfigError(f"--{name} {mine} contradicts {'.'.join(key_path)} = {theirs} in {values['deepspeed']}; "
                              "set it in one place (or write \"auto\" in the JSON)")
    merged = _merged(values, user, precision=values["precision"], world_size=1, device_type=device_type)
    for name, key_path in _CONFIG_PATHS.items():
        if name != "train_batch_size" and _get(merged, key_path) is not None:
            values[name] = _get(merged, key_path)
    if values["train_batch_size"] is None and isinstance(_get(user, ("train_batch_size",)), int):
        values["train_batch_size"] = user["train_batch_size"]
    values["precision"] = ("bf16" if _get(merged, ("bf16", "enabled")) else
                           "fp16" if _get(merged, ("fp16", "enabled")) else "fp32")
    values["deepspeed_json"] = json.dumps(user)
    return values


def build(optim, *, world_size, device_type):
    """The DeepSpeed config for this run (a new dict each call); raises ConfigError on any contradiction with the
    rank count, and on what DeepSpeed's own config models reject. The learning-rate schedule is not in it
    (schedule.lr_schedule) unless the JSON brings a "scheduler"."""
    user = json.loads(optim.deepspeed_json) if optim.deepspeed_json else None
    config = _merged(optim.flag_values(), user, precision=optim.precision, world_size=world_size,
                     device_type=device_type)
    _validate(config, world_size=world_size, device_type=device_type)
    if user is not None:
        _check_with_deepspeed(config, optim.deepspeed)
    return config


class _ReadKeys(dict):
    """A dict that records which keys are looked up: the top-level keys DeepSpeed reads while it parses a
    config, so the rest can be named (DeepSpeed itself ignores unknown top-level keys in silence)."""

    def __init__(self, *args, read=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set() if read is None else read

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _check_with_deepspeed(config, path):
    """Parse the merged config with DeepSpeed's own models now, not inside deepspeed.initialize after the
    model is built: an unknown nested key or a bad value is one ConfigError; unknown top-level keys (which
    DeepSpeed would ignore) are a warning that names them."""
    # One rank's view: the batch sizes across ranks were checked by _validate already.
    probe = _ReadKeys(copy.deepcopy(config), train_batch_size=config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"])
    try:
        DeepSpeedConfig(probe)
    except Exception as error:  # pydantic's ValidationError, DeepSpeedConfigError, AssertionError, ...
        raise ConfigError(f"--deepspeed {path}: {_one_line(error)}") from None
    unknown = sorted(set(config) - probe.read)
    if unknown:
        warn(f"--deepspeed {path}: DeepSpeed does not know the top-level key(s) {', '.join(unknown)} and ignores them")


def _one_line(error):
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic: "<model>: <field path>: <message>" for each problem
        title = getattr(error, "title", "config")
        return "; ".join(f"{title}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
    return " ".join(str(error).split()) or type(error).__name__


def resolve_precision(precision, device_type):
    if precision != "auto":
        return precision
    if device_type == "cpu":
        return "fp32"  # bf16 runs on CPU but is slower than fp32 on most CPUs; fp16 does not run
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def _validate(config, *, world_size, device_type):
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    for name, value in (("train_micro_batch_size_per_gpu (--per_device_train_batch_size)", micro),
                        ("gradient_accumulation_steps", accum), ("train_batch_size", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if micro * accum * world_size != total:
        raise ConfigError(
            f"batch sizes do not multiply out: train_batch_size {total} != micro batch {micro} x "
            f"gradient accumulation {accum} x {world_size} rank(s) = {micro * accum * world_size}"
        )
    fp16 = bool(_get(config, ("fp16", "enabled")))
    bf16 = bool(_get(config, ("bf16", "enabled")))
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled; pick one precision")
    if fp16 and device_type == "cpu":
        raise ConfigError("fp16 is not supported on CPU (DeepSpeed: 'Type fp16 is not supported'); "
                          "use --precision bf16 or fp32")
    stage = _get(config, ("zero_optimization", "stage"))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    clip = config.get("gradient_clipping", 0)
    if not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"gradient_clipping (--max_grad_norm) must be >= 0, got {clip!r}")
    lr = _get(config, ("optimizer", "params", "lr"))
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"learning rate must be > 0, got {lr!r}")
