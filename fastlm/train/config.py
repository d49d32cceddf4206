"""The runner's configuration: its arguments (fastlm's flags, the Hugging Face run_clm.py / run_mlm.py /
TrainingArguments flags, DeepSpeed's), the checks among them, the DeepSpeed config built from them, the
learning-rate schedule and when to log, evaluate and save.

Nothing here starts a process group, reads data or builds a model: every contradiction is a ConfigError
raised before a run begins. HF flags without effect here, or that cannot be honoured, are judged in
fastlm/hf_flags.py.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fastlm import hf_flags
from fastlm.tokenizer import check_trained_vocab_size

TASKS = ("auto", "clm", "mlm")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# transformers' get_scheduler names. reduce_lr_on_plateau and greedy step on evaluation metrics, which the
# DeepSpeed engine never hands its scheduler.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
PACKINGS = ("blocks", "documents")
STRATEGIES = ("no", "steps", "epoch")
# Every AdamW name of TrainingArguments' --optim: the runner's optimizer is torch's AdamW (DeepSpeed's fused
# one on GPUs), which is what they all compute.
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused")
DTYPES = ("auto", "bfloat16", "float16", "float32")

# Model shapes to train from scratch with the store's tokenizer: (model_type, config overrides).
PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=64)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128)),
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768)),
    "roberta-tiny": ("roberta", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256)),
    "bert-tiny": ("bert", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256)),
}


class ConfigError(ValueError):
    """A contradictory or impossible run configuration, found before anything starts."""


def _help(text, **extra):
    return dict(metadata=dict(help=text, **extra))


@dataclass
class Args:
    task: str = dataclasses.field(default="auto", **_help(
        "causal or masked language modelling; auto: mlm for models with a masked-LM head (BERT, RoBERTa, ...), "
        "else clm", choices=TASKS))
    # model
    model_name_or_path: str = dataclasses.field(default=None, **_help("fine-tune this local dir or hub model"))
    config_name: str = dataclasses.field(default=None, **_help(
        f"from scratch: a config dir/hub name or a preset {sorted(PRESETS)}; with --model_name_or_path, the "
        "config to load its weights into"))
    model_type: str = dataclasses.field(default=None, **_help("from scratch: a transformers model type (gpt2, bert, ...) "
                                                               "with its default config"))
    config_overrides: str = dataclasses.field(default=None, **_help(
        "from scratch: config changes, e.g. n_embd=128,n_layer=4 (transformers' update_from_string)"))
    tokenizer_name: str = dataclasses.field(default=None, **_help("tokenizer for --train_file/--dataset_name"))
    trust_remote_code: bool = dataclasses.field(default=False, **_help("allow model code from the hub"))
    model_revision: str = dataclasses.field(default="main", **_help("hub branch, tag or commit of the model"))
    dtype: str = dataclasses.field(default=None, **_help(
        "HF's model dtype: bfloat16/float16 train in that precision (as --bf16/--fp16)", choices=DTYPES,
        aliases=("--torch_dtype",)))
    # data
    # The four source flags take lists (nargs="+"): their type is that of each item.
    train_store: str = dataclasses.field(default=None, **_help(
        "token store made by `fastlm prepare`; several blend into a mixture: [NAME=]PATH[:WEIGHT] ... "
        "(e.g. web:0.7 books:0.3; no weights: in proportion to their blocks)", nargs="+", metavar="STORE"))
    eval_store: str = dataclasses.field(default=None, **_help(
        "evaluation token store(s), each evaluated on its own: [NAME=]PATH ...", nargs="+", metavar="STORE"))
    train_file: str = dataclasses.field(default=None, **_help(
        "text/json/csv file(s), prepared into the cache; a mixture as for --train_store", nargs="+", metavar="FILE"))
    validation_file: str = dataclasses.field(default=None, **_help(
        "evaluation text/json/csv file(s), each its own set: [NAME=]PATH ...", nargs="+", metavar="FILE"))
    dataset_name: str = dataclasses.field(default=None, **_help("a `datasets` dataset (needs network once)"))
    dataset_config_name: str = dataclasses.field(default=None, **_help("its configuration, e.g. wikitext-2-raw-v1"))
    cache_dir: str = dataclasses.field(default=None, **_help(
        "where prepared stores go (default: $FASTLM_CACHE or ~/.cache/fastlm, shared by all runs)"))
    overwrite_cache: bool = dataclasses.field(default=False, **_help("prepare the stores again"))
    preprocessing_num_workers: int = dataclasses.field(default=None, **_help("tokenizer threads while preparing"))
    train_tokenizer: bool = dataclasses.field(default=False, **_help("train a byte-level BPE on the train text"))
    vocab_size: int = dataclasses.field(default=8192, **_help("vocabulary size for --train_tokenizer"))
    doc_boundary: str = dataclasses.field(
        default="line", **_help("documents in text files", choices=("line", "paragraph", "file"))
    )
    keep_linebreaks: bool = dataclasses.field(default=True, **_help("a line document keeps its line break (run_clm's flag)"))
    skip_blank_lines: bool = dataclasses.field(default=False, **_help(
        "drop whitespace-only lines and empty rows; by default they are documents, as run_clm/run_mlm's loaders keep them"))
    line_by_line: bool = dataclasses.field(default=False, **_help(
        "one line (document) per block, truncated to --block_size and padded; blank lines dropped (run_mlm's flag)"))
    validation_split_percentage: float = dataclasses.field(
        default=5.0, **_help("hold out this %% of train documents when no evaluation set is given (0: none)")
    )
    max_train_samples: int = dataclasses.field(default=None, **_help("train on the first N blocks only"))
    max_eval_samples: int = dataclasses.field(default=None, **_help("evaluate on the first N blocks only"))
    block_size: int = dataclasses.field(default=128, **_help("tokens per block (run_mlm: --max_seq_length)",
                                                             aliases=("--max_seq_length",)))
    packing: str = dataclasses.field(
        default="blocks", **_help("blocks: cut the document stream; documents: best-fit whole documents", choices=PACKINGS)
    )
    separator: str = dataclasses.field(
        default="none", **_help("token after each document in --packing blocks", choices=("none", "eos"))
    )
    mlm_probability: float = dataclasses.field(default=0.15, **_help("fraction of tokens masked for MLM"))
    eval_stride: int = dataclasses.field(default=None, **_help("CLM: strided sliding-window evaluation"))
    dataloader_num_workers: int = dataclasses.field(default=0, **_help(
        "DataLoader worker processes. 0 gathers (and masks) in the training process: the kernels take "
        "microseconds a batch, less than handing a batch over from a worker"))
    # optimisation (mirrored into the DeepSpeed config)
    per_device_train_batch_size: int = dataclasses.field(default=8, **_help("micro batch per rank"))
    per_device_eval_batch_size: int = dataclasses.field(default=8, **_help("evaluation batch per rank"))
    gradient_accumulation_steps: int = dataclasses.field(default=1, **_help("micro batches per optimizer step"))
    train_batch_size: int = dataclasses.field(default=None, **_help("global batch; must equal micro*accum*ranks"))
    learning_rate: float = dataclasses.field(default=5e-5, **_help("peak AdamW learning rate"))
    weight_decay: float = dataclasses.field(default=0.0, **_help("AdamW weight decay (not on biases/norms)"))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = dataclasses.field(default="adamw_torch", **_help(f"the optimizer: AdamW ({', '.join(ADAMW)})"))
    max_grad_norm: float = dataclasses.field(default=1.0, **_help("gradient clipping (0: off)"))
    lr_scheduler_type: str = dataclasses.field(default="linear", **_help("transformers' schedule after warmup",
                                                                         choices=SCHEDULERS + ("reduce_lr_on_plateau", "greedy")))
    lr_scheduler_kwargs: str = dataclasses.field(default=None, **_help("its extra arguments as JSON, e.g. '{\"num_cycles\": 2}'"))
    warmup_steps: float = dataclasses.field(default=0, **_help("linear warmup steps (below 1: a fraction of the run)"))
    warmup_ratio: float = dataclasses.field(default=None, **_help("warmup as a fraction of the run (transformers 4's flag)"))
    num_train_epochs: float = dataclasses.field(default=3.0, **_help("epochs, unless --max_steps is set (as HF: 3)"))
    max_steps: int = dataclasses.field(default=0, **_help("optimizer steps (overrides epochs when > 0)"))
    zero_stage: int = dataclasses.field(default=0, **_help("ZeRO stage", choices=(0, 1, 2, 3)))
    precision: str = dataclasses.field(
        default="auto", **_help("auto: bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU", choices=PRECISIONS)
    )
    bf16: bool = dataclasses.field(default=False, **_help("= --precision bf16"))
    fp16: bool = dataclasses.field(default=False, **_help("= --precision fp16"))
    tf32: bool = dataclasses.field(default=None, **_help("allow TF32 matmuls on Ampere+ GPUs"))
    gradient_checkpointing: bool = dataclasses.field(default=False, **_help("recompute activations in the backward pass"))
    gradient_checkpointing_kwargs: str = dataclasses.field(default=None, **_help("as JSON, e.g. '{\"use_reentrant\": false}'"))
    seed: int = 42
    # what to run, and when to log, evaluate and save
    do_train: bool = dataclasses.field(default=False, **_help("train (with neither --do_train nor --do_eval: both)"))
    do_eval: bool = dataclasses.field(default=False, **_help("evaluate at the end; alone: evaluate the model only"))
    output_dir: str = dataclasses.field(default="runs/fastlm", **_help("metrics, results, model, checkpoints"))
    overwrite_output_dir: bool = dataclasses.field(default=False, **_help(
        "start over in an output_dir that holds checkpoints (they are deleted)"))
    logging_strategy: str = dataclasses.field(default="steps", **_help("when to log", choices=STRATEGIES))
    logging_steps: float = dataclasses.field(default=10, **_help("log every N optimizer steps (below 1: a fraction)"))
    logging_first_step: bool = dataclasses.field(default=False, **_help("also log the first step"))
    eval_strategy: str = dataclasses.field(default=None, **_help(
        "when to evaluate during training (default: steps if --eval_steps, else no); always at the end", choices=STRATEGIES,
        aliases=("--evaluation_strategy",)))
    eval_steps: float = dataclasses.field(default=0, **_help("evaluate every N steps (default: --logging_steps with steps)"))
    save_strategy: str = dataclasses.field(default=None, **_help(
        "when to write a DeepSpeed checkpoint (default: steps if --save_steps, else no)", choices=STRATEGIES + ("best",)))
    save_steps: float = dataclasses.field(default=0, **_help("checkpoint every N steps (0: none; 500 with --save_strategy steps)"))
    save_total_limit: int = dataclasses.field(default=None, **_help("keep only the newest N checkpoints"))
    report_to: str = dataclasses.field(default="none", **_help("none, tensorboard or all (= tensorboard when installed)",
                                                                nargs="+"))
    logging_dir: str = dataclasses.field(default=None, **_help("tensorboard event files (default: <output_dir>/runs)"))
    resume: bool = dataclasses.field(default=False, **_help("continue from the latest checkpoint in output_dir"))
    resume_from_checkpoint: str = dataclasses.field(default=None, **_help(
        "continue from PATH (a checkpoint or a directory of them); bare: the latest in output_dir", nargs="?", const=""))
    ddp_timeout: int = dataclasses.field(default=300, **_help(
        "seconds a rank waits in a collective before it names the ranks that stopped and exits"))
    ddp_backend: str = dataclasses.field(default=None, **_help("process-group backend (default: gloo on CPU, nccl on GPU)"))
    disable_tqdm: bool = False
    local_rank: int = dataclasses.field(default=-1, **_help("set by the deepspeed launcher"))
    deepspeed: str = dataclasses.field(default=None, **_help("a DeepSpeed JSON config merged with these flags"))


DESCRIPTION = ("Train a causal-LM or masked-LM head on packed blocks with DeepSpeed and report perplexity. "
               "Takes run_clm.py / run_mlm.py command lines.")

_HF_SAVE_STEPS = 500  # TrainingArguments' save_steps default, for --save_strategy steps without --save_steps


def _str_to_bool(text):
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in hf_flags.TRUTHY or value in hf_flags.FALSY - {"none", ""}:
        return value in hf_flags.TRUTHY
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Flags whose change alters what a resumed run computes: --resume refuses a checkpoint saved with other
# values. The data layout (micro batch, accumulation, ranks) is not among them: a step trains on the same
# samples whatever their split (data.TrainBatches), and the training data is compared by content.
RESULT_FLAGS = ("task", "model_name_or_path", "config_name", "model_type", "config_overrides", "block_size",
                "line_by_line", "packing", "separator",
                "mlm_probability", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                "max_grad_norm", "lr_scheduler_type", "warmup_steps", "zero_stage", "precision", "seed")
# Flags that only change how long the run goes on (and so where the schedule's decay ends): a resumed run
# may change them, and is told what that does.
LENGTH_FLAGS = ("max_steps", "num_train_epochs")


def resume_settings(args):
    """The flag values a checkpoint records, for --resume to compare (RESULT_FLAGS, LENGTH_FLAGS)."""
    return {name: getattr(args, name) for name in RESULT_FLAGS + LENGTH_FLAGS}


def _parser(suppress_defaults=False):
    parser = argparse.ArgumentParser(
        prog="fastlm train", description=DESCRIPTION, conflict_handler="resolve",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    for f in dataclasses.fields(Args):
        if f.name == "deepspeed":
            continue  # added below, after DeepSpeed's own arguments
        kwargs = {k: v for k, v in f.metadata.items() if k != "aliases"}
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        if not suppress_defaults:
            kwargs["default"] = f.default
        if f.type is bool:
            # HF's form: a bare flag, or `--do_train true`; `--no_keep_linebreaks` for those on by default.
            parser.add_argument(*names, type=_str_to_bool, nargs="?", const=True, **kwargs)
            if f.default is True:
                parser.add_argument(f"--no_{f.name}", action="store_false", dest=f.name, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, type=f.type, **kwargs)
    for name in hf_flags.FOREIGN:
        parser.add_argument(f"--{name}", dest=f"foreign:{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    import deepspeed

    deepspeed.add_config_arguments(parser)
    # DeepSpeed's --deepspeed is a bare flag; HF Trainer users pass `--deepspeed cfg.json`: take both.
    parser.add_argument("--deepspeed", nargs="?", const=None, metavar="CFG_JSON",
                        help="a DeepSpeed JSON config merged with these flags (same as --deepspeed_config)",
                        **({} if suppress_defaults else {"default": None}))
    return parser


def parse_args(argv):
    """Args plus the names the user set explicitly (a JSON config may fill the others)."""
    args, explicit, _ = parse(argv)
    return args, explicit


def parse(argv):
    """(args, explicit names, the parser, to report later errors in its usage format).

    `run_clm.py args.json` form: a single .json argument holds the flags. Unknown flags, HF flags that
    cannot be honoured and contradictions among HF's aliases exit with status 2 and one message."""
    argv = _json_argv(argv)
    parser = _parser()
    namespace, rest = parser.parse_known_args(argv)
    _refuse_unknown(parser, rest)
    explicit = set(vars(_parser(suppress_defaults=True).parse_known_args(argv)[0]))
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(Args)}
    values["deepspeed"] = namespace.deepspeed or namespace.deepspeed_config
    args = Args(**values)
    foreign = {key.split(":", 1)[1]: value for key, value in vars(namespace).items() if key.startswith("foreign:")}
    try:
        _judge_foreign(foreign)
        _translate_hf(args, explicit)
    except ConfigError as error:
        parser.error(str(error))
    return args, explicit, parser


def _json_argv(argv):
    if len(argv) != 1 or not argv[0].endswith(".json"):
        return argv
    path = Path(argv[0])
    try:
        flags = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"fastlm train: error: {path}: cannot read the arguments file ({error})")
    if not isinstance(flags, dict):
        sys.exit(f"fastlm train: error: {path}: an arguments file holds one JSON object of flag: value")
    out = []
    for name, value in flags.items():
        values = value if isinstance(value, list) else [value]
        out += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return out


def _refuse_unknown(parser, rest):
    if not rest:
        return
    for token in rest:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name and hf_flags.is_hf_flag(name):
            parser.error(f"--{name} is a Hugging Face TrainingArguments flag that fastlm does not implement")
    parser.error(f"unrecognized arguments: {' '.join(rest)}")


def _rank0():
    return os.environ.get("RANK", "0") == "0"


def warn(message):
    """One warning line, from rank 0 only (every rank parses the same flags)."""
    if _rank0():
        print(f"[fastlm] warning: {message}", file=sys.stderr, flush=True)


def _judge_foreign(foreign):
    for name, value in foreign.items():
        verdict = hf_flags.judge(name, value)
        if verdict is None:
            continue
        fatal, message = verdict
        if fatal:
            raise ConfigError(message)
        warn(message)


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


def _translate_hf(args, explicit):
    """HF's spellings onto the runner's own settings: precision flags, warmup ratio, -1 for "no max_steps",
    do_train/do_eval, strategies and resume_from_checkpoint."""
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are both set; pick one precision")
    wanted = "bf16" if args.bf16 else "fp16" if args.fp16 else {"bfloat16": "bf16", "float16": "fp16",
                                                                  "float32": "fp32"}.get(args.dtype)
    if wanted:
        if "precision" in explicit and args.precision != wanted:
            raise ConfigError(f"--precision {args.precision} contradicts "
                              f"{'--bf16' if args.bf16 else '--fp16' if args.fp16 else '--dtype ' + args.dtype}")
        args.precision = wanted
    if args.warmup_ratio is not None:
        if "warmup_steps" in explicit:
            raise ConfigError("give --warmup_steps or --warmup_ratio, not both")
        if not 0 <= args.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
        args.warmup_steps = args.warmup_ratio
    if args.max_steps < 0:
        args.max_steps = 0  # TrainingArguments' -1: train by epochs
    if args.optim not in ADAMW:
        raise ConfigError(f"--optim {args.optim} is not supported: the runner trains with AdamW ({', '.join(ADAMW)})")
    if args.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy"):
        raise ConfigError(f"--lr_scheduler_type {args.lr_scheduler_type} is not supported: it steps on evaluation "
                          "metrics, which the DeepSpeed engine never hands its scheduler")
    args.lr_scheduler_kwargs = _json_flag("lr_scheduler_kwargs", args.lr_scheduler_kwargs)
    args.gradient_checkpointing_kwargs = _json_flag("gradient_checkpointing_kwargs", args.gradient_checkpointing_kwargs)
    if args.lr_scheduler_type == "constant" and args.warmup_steps:
        warn("--lr_scheduler_type constant has no warmup (as in transformers); use constant_with_warmup")
    if not ("do_train" in explicit or "do_eval" in explicit):
        args.do_train = args.do_eval = True  # fastlm's default: train, then evaluate
    if args.eval_strategy is None:
        args.eval_strategy = "steps" if args.eval_steps else "no"
    if args.eval_strategy != "no":
        args.do_eval = True  # TrainingArguments does the same
        if args.eval_strategy == "steps" and not args.eval_steps:
            args.eval_steps = args.logging_steps
    if args.save_strategy is None:
        args.save_strategy = "steps" if args.save_steps else "no"
    if args.save_strategy == "best":
        raise ConfigError("--save_strategy best is not supported: " + hf_flags.FOREIGN["load_best_model_at_end"].reason)
    if args.save_strategy == "steps" and not args.save_steps:
        args.save_steps = _HF_SAVE_STEPS
    args.report_to = _report_to(args.report_to)
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint.lower() in hf_flags.FALSY - {""}:
            args.resume_from_checkpoint = None
        else:
            args.resume = True
    if args.task == "auto" and (args.config_name in PRESETS or args.model_type):
        resolve_task(args)  # known without reading a config file; check_args resolves the rest


def _report_to(values):
    names = {v.strip().lower() for value in ([values] if isinstance(values, str) else values) for v in value.split(",")}
    names.discard("")
    if names & {"none", "no"}:
        return []
    if "all" in names:
        return ["tensorboard"]
    ignored = sorted(names - {"tensorboard"})
    if ignored:
        warn(f"--report_to {' '.join(ignored)} has no effect here: fastlm reports to metrics.jsonl, "
             "trainer_state.json and (with --report_to tensorboard) tensorboard event files")
    return ["tensorboard"] if "tensorboard" in names else []


def resolve_task(args):
    """--task auto: mlm when the model type has a masked-LM head in transformers (BERT, RoBERTa, ...),
    else clm -- so a run_mlm.py command needs no --task. Reads the model's config.json when needed."""
    if args.task != "auto":
        return args.task
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if args.config_name in PRESETS:
        model_type = PRESETS[args.config_name][0]
    elif args.model_type:
        model_type = args.model_type
    else:
        model_type = load_config(args).model_type
    args.task = "mlm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"
    return args.task


def load_config(args):
    """The transformers config the run's model is built from (presets aside), as run_clm.py finds it:
    --config_name, else --model_name_or_path's, else --model_type's defaults; then --config_overrides."""
    from transformers import CONFIG_MAPPING, AutoConfig

    name = args.config_name or args.model_name_or_path
    try:
        if name:
            config = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code,
                                                revision=args.model_revision)
        else:
            config = CONFIG_MAPPING[args.model_type]()
    except KeyError:
        raise ConfigError(f"--model_type {args.model_type} is not a transformers model type") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the model config {name!r}: {str(error).splitlines()[0]}") from None
    apply_config_overrides(config, args.config_overrides)
    return config


def apply_config_overrides(config, overrides):
    if not overrides:
        return
    try:
        config.update_from_string(overrides)
    except ValueError as error:
        raise ConfigError(f"--config_overrides {overrides!r}: {error}") from None


# --- DeepSpeed config ---------------------------------------------------------------------------------

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


def _set(config, path, value):
    for key in path[:-1]:
        config = config.setdefault(key, {})
    config[path[-1]] = value


def _merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif value != "auto":  # HF's convention: "auto" means "take the command line's value"
            base[key] = value
    return base


def build_ds_config(args, *, world_size, device_type, explicit=frozenset()):
    """The DeepSpeed config for this run; raises ConfigError on any contradiction.

    Built from the flags, then merged with --deepspeed JSON: the file wins over defaults, a file value
    that contradicts a flag the user set is an error, and "auto" takes the flag. `args` is updated to
    the merged batch sizes, stage, precision and learning rate so the data pipeline uses the same ones.
    The learning-rate schedule is not in it (see lr_schedule) unless the JSON brings a "scheduler".
    """
    precision = resolve_precision(args.precision, device_type)
    cpu = device_type == "cpu"
    config = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.train_batch_size
        or args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay,
            # torch's AdamW on CPU: DeepSpeed's FusedAdam would JIT-compile a CUDA/C++ op first. Its fused
            # kernel (Trainer's default, adamw_torch_fused): the per-tensor loop torch picks on CPU otherwise
            # took ~4% of a tiny model's step.
            **({"torch_adam": True, "fused": True} if cpu else {})}},
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }
    if args.deepspeed:
        path = Path(args.deepspeed)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"--deepspeed {path}: cannot read a JSON config ({error})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"--deepspeed {path}: a DeepSpeed config is a JSON object ({{...}}), "
                              f"this file holds a {type(user).__name__}")
        for name, key_path in _CONFIG_PATHS.items():
            mine, theirs = getattr(args, name), _get(user, key_path)
            if name in explicit and theirs not in (None, "auto") and theirs != mine:
                raise ConfigError(
                    f"--{name} {mine} contradicts {'.'.join(key_path)} = {theirs} in {path}; "
                    "set it in one place (or write \"auto\" in the JSON)"
                )
        if "bf16" in user or "fp16" in user:
            config.pop("bf16"), config.pop("fp16")
        config = _merge(config, user)
        if args.train_batch_size is None and _get(user, ("train_batch_size",)) in (None, "auto"):
            config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * world_size)
    _validate(config, world_size=world_size, device_type=device_type)
    if args.deepspeed:
        _check_with_deepspeed(config, args.deepspeed)
    for name, key_path in _CONFIG_PATHS.items():
        if _get(config, key_path) is not None:
            setattr(args, name, _get(config, key_path))
    args.precision = "bf16" if _get(config, ("bf16", "enabled")) else "fp16" if _get(config, ("fp16", "enabled")) else "fp32"
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
    from deepspeed.runtime.config import DeepSpeedConfig

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


def lr_schedule(args, total_steps):
    """transformers' get_scheduler for --lr_scheduler_type, as a function of the optimizer (what
    deepspeed.initialize takes). --warmup_steps below 1 is a fraction of the run, as in TrainingArguments.
    (DeepSpeed's WarmupDecayLR warms up for at least two steps at lr 0 and rejects warmup 0.)"""
    from transformers import get_scheduler

    warmup = args.warmup_steps if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * total_steps)

    def schedule(optimizer):
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup),
                             num_training_steps=total_steps, scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs))

    return schedule


def check_lr_schedule(args, total_steps):
    """Build the schedule once on a stand-in optimizer, so missing or unknown --lr_scheduler_kwargs are a
    ConfigError before the model is built rather than a traceback inside deepspeed.initialize."""
    import torch

    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        lr_schedule(args, total_steps)(stand_in)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--lr_scheduler_type {args.lr_scheduler_type} with --lr_scheduler_kwargs "
                          f"{json.dumps(args.lr_scheduler_kwargs)}: {error}") from None


class Intervals:
    """When to log, evaluate and save, from the *_strategy / *_steps flags. A steps value below 1 is a
    fraction of the run's optimizer steps, as in TrainingArguments. The last step always logs (the
    final train loss needs it); the evaluation after the last step is the final one, not an interval's."""

    def __init__(self, args, total_steps):
        self.total_steps = total_steps
        self.first = args.logging_first_step
        self.log_every = self._every(args.logging_strategy, args.logging_steps, "logging_steps")
        self.eval_every = self._every(args.eval_strategy, args.eval_steps, "eval_steps")
        self.save_every = self._every(args.save_strategy, args.save_steps, "save_steps")

    def _every(self, strategy, steps, name):
        if strategy != "steps":
            return strategy  # "no" or "epoch"
        if steps < 1:
            return max(1, math.ceil(steps * self.total_steps))
        if steps != int(steps):
            raise ConfigError(f"--{name} must be a whole number of steps when above 1, got {steps}")
        return int(steps)

    @staticmethod
    def _due(every, step, epoch_end):
        return epoch_end if every == "epoch" else every != "no" and step % every == 0

    def log(self, step, epoch_end=False):
        return step == self.total_steps or (self.first and step == 1) or self._due(self.log_every, step, epoch_end)

    def evaluate(self, step, epoch_end=False):
        return step != self.total_steps and self._due(self.eval_every, step, epoch_end)

    def save(self, step, epoch_end=False):
        return self._due(self.save_every, step, epoch_end)


def resolve_precision(precision, device_type):
    if precision != "auto":
        return precision
    if device_type == "cpu":
        return "fp32"  # bf16 runs on CPU but is slower than fp32 on most CPUs; fp16 does not run
    import torch

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


# --- output directory and checkpoints ----------------------------------------------------------------

def checkpoint_dir(args):
    return Path(args.output_dir) / "checkpoints"


def resume_point(args):
    """(checkpoint directory, tag or None for its `latest`) that --resume / --resume_from_checkpoint load.
    PATH may be one checkpoint (a DeepSpeed tag directory), a directory of them, or an output_dir."""
    given = args.resume_from_checkpoint
    if not given or given.lower() in hf_flags.TRUTHY:
        return checkpoint_dir(args), None
    path = Path(given)
    if (path / "latest").is_file():
        return path, None
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints", None
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise ConfigError(f"--resume_from_checkpoint {given}: not a checkpoint, nor a directory holding checkpoints "
                      "(a 'latest' file)")


def _has_checkpoints(directory):
    return directory.is_dir() and any(directory.iterdir())


# --- training and evaluation sources -------------------------------------------------------------------

SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    """One training source or evaluation set of the command line. weight None: in proportion to its size."""
    name: str
    path: str
    weight: float = None


def _split_name(value, flag):
    name, sep, path = value.partition("=")
    if sep and SOURCE_NAME.fullmatch(name) and path:
        return name, path
    if sep and not path:
        raise ConfigError(f"{flag} {value}: no path after {name}=")
    return None, value


def _default_name(path):
    """A source's name from its path: a store's directory name, a file's name without its suffix."""
    base = Path(path.rstrip("/")).name
    base = base.split(".", 1)[0] if "." in base.lstrip(".") else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "data"


def _weight(path, flag):
    """(path, weight or None) of PATH[:WEIGHT]; a path that exists as given keeps any colon it has."""
    head, sep, tail = path.rpartition(":")
    if not sep or Path(path).exists():
        return path, None
    try:
        weight = float(tail)
    except ValueError:
        return path, None
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{flag} {path}: the weight must be a finite number > 0, got {tail}")
    return head, weight


def _sources(values, flag, *, weighted):
    entries = []
    for value in values:
        name, path = _split_name(value, flag)
        path, weight = _weight(path, flag) if weighted else (path, None)
        entries.append(Source(name or _default_name(path), path, weight))
    names = [source.name for source in entries]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{flag}: two sources are named {name!r}; name them apart as NAME=PATH")
    return entries


def train_sources(values, flag="--train_store"):
    """--train_store / --train_file values ([NAME=]PATH[:WEIGHT] ...) as Sources; all weighted or none."""
    sources = _sources(values, flag, weighted=True)
    given = [source.weight is not None for source in sources]
    if any(given) and not all(given):
        raise ConfigError(f"{flag}: give a weight to every source or to none (none: in proportion to their "
                          f"blocks), got {' '.join(values)}")
    return sources


def eval_sources(values, flag="--eval_store"):
    """--eval_store / --validation_file values ([NAME=]PATH ...) as Sources."""
    return _sources(values, flag, weighted=False)


def check_args(args):
    """Contradictions among the flags themselves; raises ConfigError. Resolves --task auto (which may read
    the model's config.json) before the task-dependent checks."""
    given_train = [name for name in ("train_store", "train_file", "dataset_name") if getattr(args, name)]
    stores = bool(args.train_store or args.eval_store)
    files = bool(args.train_file or args.validation_file or args.dataset_name)
    if not (stores or files):
        raise ConfigError("give exactly one training source: --train_store, or --train_file / --dataset_name")
    if stores and files:
        raise ConfigError("give --train_store/--eval_store or --train_file/--validation_file/--dataset_name, not both")
    if args.train_file and args.dataset_name:
        raise ConfigError("give --train_file or --dataset_name, not both")
    if args.do_train and not given_train:
        raise ConfigError("--do_train needs a training source: --train_store, --train_file or --dataset_name")
    if stores and args.train_tokenizer:
        raise ConfigError("--train_tokenizer goes with --train_file/--dataset_name; with --train_store use --eval_store")
    for flag in ("train_store", "train_file"):
        if getattr(args, flag):
            train_sources(getattr(args, flag), f"--{flag}")
    if args.max_train_samples and len(args.train_store or args.train_file or []) > 1:
        raise ConfigError("--max_train_samples takes the first blocks of one training source; a mixture blends "
                          "several (shorten the run with --max_steps)")
    for flag in ("eval_store", "validation_file"):
        if getattr(args, flag):
            eval_sources(getattr(args, flag), f"--{flag}")
    if files and not (args.train_tokenizer or args.tokenizer_name or args.model_name_or_path):
        raise ConfigError("preparing text needs a tokenizer: --tokenizer_name, --model_name_or_path "
                          "or --train_tokenizer")
    if args.train_tokenizer and not args.train_file and not args.dataset_name:
        raise ConfigError("--train_tokenizer trains on the training text: give --train_file or --dataset_name")
    if args.train_tokenizer:
        check_trained_vocab_size(args.vocab_size, "--vocab_size", error=ConfigError)
    if not (args.model_name_or_path or args.config_name or args.model_type):
        raise ConfigError("give a model: --model_name_or_path (fine-tune), or --config_name / --model_type "
                          "(from scratch)")
    if args.model_type and args.config_name:
        raise ConfigError("give --config_name or --model_type, not both")
    if args.model_type and args.model_name_or_path:
        raise ConfigError("--model_type builds a new model: it does not go with --model_name_or_path")
    if args.config_overrides and args.model_name_or_path:
        raise ConfigError("--config_overrides changes a config built from scratch; it cannot reshape "
                          "--model_name_or_path's weights")
    for name in ("block_size", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("num_train_epochs", "logging_steps", "ddp_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_steps", "save_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("max_train_samples", "max_eval_samples", "save_total_limit", "preprocessing_num_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.validation_split_percentage < 100:
        raise ConfigError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    if args.line_by_line and (args.packing != "blocks" or args.eval_stride):
        raise ConfigError("--line_by_line puts one line in each block: it does not go with --packing documents "
                          "or --eval_stride")
    if args.eval_stride is not None and not 1 <= args.eval_stride <= args.block_size:
        raise ConfigError(f"--eval_stride must be in [1, block_size={args.block_size}], got {args.eval_stride}")
    _check_output_dir(args)
    task = resolve_task(args)
    if task == "clm" and args.block_size < 2:
        raise ConfigError(f"--block_size must be >= 2 for clm (a block of n tokens holds n - 1 next-token "
                          f"targets), got {args.block_size}")
    if task == "mlm" and not 0 < args.mlm_probability < 1:
        raise ConfigError(f"--mlm_probability must be in (0, 1), got {args.mlm_probability}")
    if task != "clm" and args.eval_stride is not None:
        raise ConfigError("--eval_stride is for CLM perplexity; MLM evaluation uses fixed masks")


def _check_output_dir(args):
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; give a directory (it is created if missing)")
    if args.resume:
        if args.overwrite_output_dir:
            raise ConfigError("--overwrite_output_dir deletes the checkpoints that --resume would continue from; "
                              "give one of them")
        directory, tag = resume_point(args)
        if tag is None and not (directory / "latest").is_file():
            raise ConfigError(f"--resume: no checkpoint in {directory} (no 'latest' file)")
    elif args.do_train and _has_checkpoints(checkpoint_dir(args)) and not args.overwrite_output_dir:
        raise ConfigError(f"--output_dir {out} holds the checkpoints of an earlier run ({checkpoint_dir(args)}): "
                          "continue it with --resume (or --resume_from_checkpoint), or start over with "
                          "--overwrite_output_dir, which deletes them")
