"""Hugging Face flags: the ones the runner accepts without implementing them, and HF's spellings of its own.

A run_clm.py / run_mlm.py command line (or a TrainingArguments set) should run unchanged under
`deepspeed fastlm/run.py`. The flags the runner honours are fields of fastlm.train.flags.Flags; the ones here
are either without effect in this runner (a warning says why, the run goes on) or impossible to honour
(one error that names the flag and says why, before anything starts). A value that asks for what the
runner does anyway (`--push_to_hub false`, `--dataloader_drop_last`) passes silently. Any other
TrainingArguments flag is refused by name.
"""
import dataclasses
import json

from fastlm.train.errors import ConfigError, warn
from fastlm.train.trackers import TrackerError, resolve_report_to

FALSY = frozenset({"false", "f", "no", "n", "0", "0.0", "none", ""})
TRUTHY = frozenset({"true", "t", "yes", "y", "1"})


@dataclasses.dataclass(frozen=True)
class Foreign:
    fatal: bool  # True: the run cannot honour it; False: it has no effect here
    reason: str
    silent: frozenset = FALSY  # values (lower case) that ask for what the runner does anyway


def _no_effect(reason, silent=FALSY):
    return Foreign(False, reason, frozenset(silent))


def _unsupported(reason, silent=FALSY):
    return Foreign(True, reason, frozenset(silent))


_HUB = _no_effect("fastlm never uploads; push --output_dir yourself (it holds the model and tokenizer)")
_TRACKIO = _no_effect("fastlm's trackio runs stay in the local store (TRACKIO_DIR)")
_DDP = _no_effect("DeepSpeed, not DDP, reduces the gradients here; set its options in a --deepspeed JSON")
_LOADER = _no_effect("the runner's DataLoader settings are fixed: batches are gathered from a memory map in "
                     "microseconds, memory is pinned on GPUs")
_EVAL_OUTPUTS = _no_effect("fastlm's evaluation computes loss, perplexity and token counts only")
_COLUMNS = _no_effect("batches come from the token store, not from dataset columns")
_BEST = _unsupported("fastlm keeps the final model and does not track a best checkpoint; pick one from "
                     "metrics.jsonl and --resume_from_checkpoint it")
_ACCELERATE = _unsupported("the runner drives DeepSpeed directly, not accelerate; use --deepspeed cfg.json")
_LOGS = _no_effect("fastlm prints progress on rank 0 only and writes metrics.jsonl", {"passive", "warning", "info"})

FOREIGN = {
    # run_clm.py / run_mlm.py model and data arguments
    "token": _no_effect("set HF_TOKEN in the environment for private hub files"),
    "use_fast_tokenizer": _unsupported("fastlm tokenizes with the fast (Rust) tokenizer only", TRUTHY),
    "low_cpu_mem_usage": _no_effect("transformers 5 always loads weights this way"),
    "streaming": _unsupported("the runner reads a memory-mapped token store; `fastlm prepare` streams any corpus "
                              "into one with flat memory, and the runner does so itself for --train_file"),
    "pad_to_max_length": _no_effect("every block is padded to --block_size anyway (the loss is the same)", TRUTHY),
    # TrainingArguments
    "push_to_hub": _HUB, "hub_token": _HUB, "hub_private_repo": _HUB, "hub_model_id": _HUB, "hub_revision": _HUB,
    "hub_strategy": _no_effect(_HUB.reason, {"every_save"}), "hub_always_push": _HUB,
    "trackio_space_id": _TRACKIO,
    "trackio_bucket_id": _TRACKIO, "trackio_static_space_id": _TRACKIO,
    "log_level": _LOGS, "log_level_replica": _LOGS, "log_on_each_node": _no_effect(_LOGS.reason, TRUTHY),
    "logging_nan_inf_filter": _no_effect("metrics.jsonl logs every loss as it is", TRUTHY),
    "ddp_find_unused_parameters": _DDP, "ddp_bucket_cap_mb": _DDP, "ddp_broadcast_buffers": _DDP,
    "ddp_static_graph": _DDP,
    "dataloader_pin_memory": _no_effect(_LOADER.reason, TRUTHY), "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER, "dataloader_in_order": _no_effect(_LOADER.reason, TRUTHY),
    "dataloader_multiprocessing_context": _LOADER,
    "dataloader_drop_last": _no_effect("the runner always drops the tail that does not fill an optimizer step", TRUTHY),
    "prediction_loss_only": _no_effect(_EVAL_OUTPUTS.reason, TRUTHY), "eval_accumulation_steps": _EVAL_OUTPUTS,
    "eval_do_concat_batches": _no_effect(_EVAL_OUTPUTS.reason, TRUTHY), "eval_use_gather_object": _EVAL_OUTPUTS,
    "batch_eval_metrics": _EVAL_OUTPUTS, "include_for_metrics": _EVAL_OUTPUTS, "skip_memory_metrics": _no_effect(
        "fastlm reports no memory metrics", TRUTHY),
    "include_num_input_tokens_seen": _no_effect("metrics.jsonl always logs tokens_seen", FALSY | TRUTHY | {"all", "non_padding"}),
    "average_tokens_across_devices": _no_effect("the runner's losses are averaged as DeepSpeed averages them", TRUTHY),
    "remove_unused_columns": _no_effect(_COLUMNS.reason, TRUTHY), "label_names": _COLUMNS,
    "length_column_name": _no_effect(_COLUMNS.reason, {"length"}),
    "do_predict": _no_effect("run_clm.py and run_mlm.py have no test split either"),
    "debug": _no_effect("no debug modes here"),
    "torch_empty_cache_steps": _no_effect("the runner never empties the CUDA cache"),
    "save_on_each_node": _no_effect("rank 0 writes the model; every rank writes its own DeepSpeed checkpoint shards"),
    "save_safetensors": _no_effect("the model is always saved as safetensors", TRUTHY),
    "full_determinism": _no_effect("the data order and masks are already deterministic; kernels are torch's own"),
    "restore_callback_states_from_checkpoint": _no_effect("the runner has no callbacks"),
    "ignore_data_skip": _no_effect("resume restarts at the exact batch without replaying the ones before it"),
    "use_cache": _no_effect("training never uses the KV cache"),
    "use_cpu": _no_effect("the runner uses a GPU whenever one is visible; hide them with CUDA_VISIBLE_DEVICES= "
                          "to train on the CPU"),
    "overwrite_output_dir": None,  # an Args field; listed so no table claims it
    "auto_find_batch_size": _unsupported("set --per_device_train_batch_size (and --gradient_accumulation_steps) yourself"),
    "label_smoothing_factor": _unsupported("the runner trains on the model's own loss, without label smoothing",
                                           FALSY | {"0.", ".0"}),
    "load_best_model_at_end": _BEST, "metric_for_best_model": _BEST, "greater_is_better": _BEST,
    "fsdp": _unsupported("the runner shards with DeepSpeed ZeRO: use --zero_stage 3 (or a --deepspeed JSON)"),
    "fsdp_config": _unsupported("the runner shards with DeepSpeed ZeRO: use --zero_stage 3 (or a --deepspeed JSON)"),
    "accelerator_config": _ACCELERATE, "parallelism_config": _ACCELERATE,
    "optim_args": _unsupported("the optimizer is set by --adam_beta1/--adam_beta2/--adam_epsilon/--weight_decay, "
                               "and with --optim muon also by --muon_lr/--muon_momentum"),
    "optim_target_modules": _unsupported("the optimizer trains every parameter"),
    "use_liger_kernel": _unsupported("Liger kernels are not wired into the runner"),
    "liger_kernel_config": _unsupported("Liger kernels are not wired into the runner"),
    "neftune_noise_alpha": _unsupported("NEFTune noise is not implemented"),
    "save_only_model": _unsupported("DeepSpeed checkpoints always carry the optimizer state, so resume is exact"),
    "data_seed": _unsupported("the sample order is keyed by --seed; set that instead"),
    "eval_delay": _unsupported("evaluation follows --eval_strategy from the first step", FALSY | {"0."}),
    "eval_on_start": _unsupported("there is no evaluation before the first step; run once with --do_eval alone"),
    "bf16_full_eval": _unsupported("evaluation runs in the training precision"),
    "fp16_full_eval": _unsupported("evaluation runs in the training precision"),
    "activation_checkpointing": _unsupported("use --gradient_checkpointing"),
    "activation_checkpointing_kwargs": _unsupported("use --gradient_checkpointing_kwargs"),
    "enable_jit_checkpoint": _unsupported("DeepSpeed checkpoints are written every --save_steps"),
    "train_sampling_strategy": _unsupported("blocks are sampled uniformly by an epoch-seeded shuffle", {"random"}),
    "group_by_length": _unsupported("blocks all have --block_size tokens; there is nothing to group"),
}
FOREIGN = {name: rule for name, rule in FOREIGN.items() if rule is not None}


def judge(name, value):
    """(fatal, message) for a foreign flag given on the command line, or None when its value asks for what
    the runner does anyway. `value` is the string given, or True for a bare flag."""
    rule = FOREIGN[name]
    text = "true" if value is True else str(value).strip().lower()
    if text in rule.silent:
        return None
    if rule.fatal:
        return True, f"--{name} is not supported: {rule.reason}"
    return False, f"--{name} has no effect here: {rule.reason}"


def is_hf_flag(name):
    """Whether --name is one of TrainingArguments' flags (imported only when an unknown flag turns up)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return name in fields or (name.startswith("no_") and name[3:] in fields)


# --- HF's spellings onto the runner's settings -------------------------------------------------------------------

_HF_SAVE_STEPS = 500  # TrainingArguments' save_steps default, for --save_strategy steps without --save_steps
# Every AdamW name of TrainingArguments' --optim: the runner's optimizer is torch's AdamW (DeepSpeed's fused
# one on GPUs), which is what they all compute.
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused")


def translate(values, foreign, explicit):
    """The flag values with HF's spellings mapped onto the runner's own settings (a new dict; `values` is not
    changed): precision flags, warmup ratio, -1 for "no max_steps", do_train/do_eval, the *_strategy defaults,
    report_to and resume_from_checkpoint. Foreign flags get their verdict (a warning, or a ConfigError)."""
    for name, value in foreign.items():
        verdict = judge(name, value)
        if verdict is not None:
            fatal, message = verdict
            if fatal:
                raise ConfigError(message)
            warn(message)
    v = dict(values)
    if v["bf16"] and v["fp16"]:
        raise ConfigError("--bf16 and --fp16 are both set; pick one precision")
    wanted = "bf16" if v["bf16"] else "fp16" if v["fp16"] else {"bfloat16": "bf16", "float16": "fp16",
                                                                "float32": "fp32"}.get(v["dtype"])
    if wanted:
        if "precision" in explicit and v["precision"] != wanted:
            raise ConfigError(f"--precision {v['precision']} contradicts "
                              f"{'--bf16' if v['bf16'] else '--fp16' if v['fp16'] else '--dtype ' + v['dtype']}")
        v["precision"] = wanted
    if v["warmup_ratio"] is not None:
        if "warmup_steps" in explicit:
            raise ConfigError("give --warmup_steps or --warmup_ratio, not both")
        if not 0 <= v["warmup_ratio"] < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {v['warmup_ratio']}")
        v["warmup_steps"] = v["warmup_ratio"]
    v["max_steps"] = max(v["max_steps"], 0)  # TrainingArguments' -1: train by epochs
    v["optim"] = _optimizer(v, explicit)
    if v["lr_scheduler_type"] in ("reduce_lr_on_plateau", "greedy"):
        raise ConfigError(f"--lr_scheduler_type {v['lr_scheduler_type']} is not supported: it steps on evaluation "
                          "metrics, which the DeepSpeed engine never hands its scheduler")
    v["lr_scheduler_kwargs"] = _json_flag("lr_scheduler_kwargs", v["lr_scheduler_kwargs"])
    v["gradient_checkpointing_kwargs"] = _json_flag("gradient_checkpointing_kwargs", v["gradient_checkpointing_kwargs"])
    if v["lr_scheduler_type"] == "constant" and v["warmup_steps"]:
        warn("--lr_scheduler_type constant has no warmup (as in transformers); use constant_with_warmup")
    if not ("do_train" in explicit or "do_eval" in explicit):
        v["do_train"] = v["do_eval"] = True  # fastlm's default: train, then evaluate
    if v["eval_strategy"] is None:
        v["eval_strategy"] = "steps" if v["eval_steps"] else "no"
    if v["eval_strategy"] != "no":
        v["do_eval"] = True  # TrainingArguments does the same
        if v["eval_strategy"] == "steps" and not v["eval_steps"]:
            v["eval_steps"] = v["logging_steps"]
    if v["save_strategy"] is None:
        v["save_strategy"] = "steps" if v["save_steps"] else "no"
    if v["save_strategy"] == "best":
        raise ConfigError("--save_strategy best is not supported: " + FOREIGN["load_best_model_at_end"].reason)
    if v["save_strategy"] == "steps" and not v["save_steps"]:
        v["save_steps"] = _HF_SAVE_STEPS
    try:
        v["report_to"] = tuple(resolve_report_to(v["report_to"], warn=warn))
    except TrackerError as error:
        raise ConfigError(str(error)) from None
    if v["resume_from_checkpoint"] is not None:
        if v["resume_from_checkpoint"].lower() in FALSY - {""}:
            v["resume_from_checkpoint"] = None
        else:
            v["resume"] = True
    return v


def _optimizer(v, explicit):
    """--optim as the runner's optimizer name: "adamw" (every AdamW name of TrainingArguments) or "muon"."""
    if v["optim"] == "muon":
        return "muon"
    if v["optim"] not in ADAMW:
        raise ConfigError(f"--optim {v['optim']} is not supported: the runner trains with AdamW ({', '.join(ADAMW)}) "
                          "or muon (Muon for the transformer blocks' matrices, AdamW for the rest)")
    given = [f"--{name}" for name in ("muon_lr", "muon_momentum") if name in explicit]
    if given:
        raise ConfigError(f"{' and '.join(given)} set(s) Muon, which only --optim muon trains with")
    return "adamw"


def _json_flag(name, text):
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"--{name} must be a JSON object, e.g. '{{\"key\": 1}}' ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{name} must be a JSON object, got {text!r}")
    return value
