"""The runner's configuration: its arguments (HF-style flags plus DeepSpeed's), the checks among them,
the DeepSpeed config built from them, and the learning-rate schedule.

Nothing here starts a process group, reads data or builds a model: every contradiction is a ConfigError
raised before a run begins.
"""
import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fastlm.tokenizer import check_trained_vocab_size

TASKS = ("clm", "mlm")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant")
PACKINGS = ("blocks", "documents")

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
    task: str = dataclasses.field(default="clm", **_help("causal or masked language modelling", choices=TASKS))
    # model
    model_name_or_path: str = dataclasses.field(default=None, **_help("fine-tune this local dir or hub model"))
    config_name: str = dataclasses.field(
        default=None, **_help(f"train from scratch: a config dir/hub name or a preset {sorted(PRESETS)}")
    )
    tokenizer_name: str = dataclasses.field(default=None, **_help("tokenizer for --train_file/--dataset_name"))
    # data
    # The four source flags take lists (nargs="+"): their type is that of each item.
    train_store: str = dataclasses.field(default=None, **_help(
        "token store made by `fastlm prepare`; several blend into a mixture: [NAME=]PATH[:WEIGHT] ... "
        "(e.g. web:0.7 books:0.3; no weights: in proportion to their blocks)", nargs="+", metavar="STORE"))
    eval_store: str = dataclasses.field(default=None, **_help(
        "evaluation token store(s), each evaluated on its own: [NAME=]PATH ...", nargs="+", metavar="STORE"))
    train_file: str = dataclasses.field(default=None, **_help(
        "text/json/csv file(s), prepared into --cache_dir; a mixture as for --train_store", nargs="+", metavar="FILE"))
    validation_file: str = dataclasses.field(default=None, **_help(
        "evaluation text/json/csv file(s), each its own set: [NAME=]PATH ...", nargs="+", metavar="FILE"))
    dataset_name: str = dataclasses.field(default=None, **_help("a `datasets` dataset (needs network once)"))
    dataset_config_name: str = dataclasses.field(default=None, **_help("its configuration, e.g. wikitext-2-raw-v1"))
    cache_dir: str = dataclasses.field(default=None, **_help("where prepared stores go (default <output_dir>/data)"))
    train_tokenizer: bool = dataclasses.field(default=False, **_help("train a byte-level BPE on the train text"))
    vocab_size: int = dataclasses.field(default=8192, **_help("vocabulary size for --train_tokenizer"))
    doc_boundary: str = dataclasses.field(
        default="line", **_help("documents in text files", choices=("line", "paragraph", "file"))
    )
    validation_split_percentage: float = dataclasses.field(
        default=5.0, **_help("hold out this %% of train documents when no evaluation set is given (0: none)")
    )
    block_size: int = dataclasses.field(default=128, **_help("tokens per training block"))
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
    max_grad_norm: float = dataclasses.field(default=1.0, **_help("gradient clipping (0: off)"))
    lr_scheduler_type: str = dataclasses.field(default="linear", **_help("decay after warmup", choices=SCHEDULERS))
    warmup_steps: int = dataclasses.field(default=0, **_help("linear warmup steps"))
    num_train_epochs: int = dataclasses.field(default=1, **_help("epochs, unless --max_steps is set"))
    max_steps: int = dataclasses.field(default=0, **_help("optimizer steps (overrides epochs when > 0)"))
    zero_stage: int = dataclasses.field(default=0, **_help("ZeRO stage", choices=(0, 1, 2, 3)))
    precision: str = dataclasses.field(
        default="auto", **_help("auto: bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU", choices=PRECISIONS)
    )
    seed: int = 42
    # output
    output_dir: str = dataclasses.field(default="runs/fastlm", **_help("metrics, results, model, checkpoints"))
    logging_steps: int = dataclasses.field(default=10, **_help("log every N optimizer steps"))
    eval_steps: int = dataclasses.field(default=0, **_help("evaluate every N steps (0: only at the end)"))
    save_steps: int = dataclasses.field(default=0, **_help("DeepSpeed checkpoint every N steps (0: none)"))
    resume: bool = dataclasses.field(default=False, **_help("continue from the latest checkpoint in output_dir"))
    disable_tqdm: bool = False
    local_rank: int = dataclasses.field(default=-1, **_help("set by the deepspeed launcher"))
    deepspeed: str = dataclasses.field(default=None, **_help("a DeepSpeed JSON config merged with these flags"))


DESCRIPTION = "Train a causal-LM or masked-LM head on packed blocks from a token store with DeepSpeed; report perplexity."


# Flags whose change alters what a resumed run computes: --resume refuses a checkpoint saved with other
# values. The data layout (micro batch, accumulation, ranks) is not among them: a step trains on the same
# samples whatever their split (data.TrainBatches), and the training data is compared by content.
RESULT_FLAGS = ("task", "model_name_or_path", "config_name", "block_size", "packing", "separator",
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
        kwargs = dict(f.metadata)
        if not suppress_defaults:
            kwargs["default"] = f.default
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(f"--{f.name}", type=kind, **kwargs)
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
    """(args, explicit names, the parser, to report later errors in its usage format)."""
    parser = _parser()
    namespace = parser.parse_args(argv)
    explicit = set(vars(_parser(suppress_defaults=True).parse_args(argv)))
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(Args)}
    values["deepspeed"] = namespace.deepspeed or namespace.deepspeed_config
    return Args(**values), explicit, parser


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
    for name, key_path in _CONFIG_PATHS.items():
        if _get(config, key_path) is not None:
            setattr(args, name, _get(config, key_path))
    args.precision = "bf16" if _get(config, ("bf16", "enabled")) else "fp16" if _get(config, ("fp16", "enabled")) else "fp32"
    return config


def lr_schedule(args, total_steps):
    """Warmup then decay, as a factor of the peak learning rate by optimizer step: HF's
    get_linear/cosine_schedule_with_warmup. (DeepSpeed's WarmupDecayLR warms up for at least two steps
    at lr 0 and rejects warmup 0, so the schedule is ours, handed to deepspeed.initialize.)"""
    warmup, decay = args.warmup_steps, max(1, total_steps - args.warmup_steps)

    def factor(step):
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / decay)
        if args.lr_scheduler_type == "linear":
            return 1.0 - progress
        if args.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


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
    """Contradictions among the flags themselves; raises ConfigError."""
    stores = bool(args.train_store)
    files = bool(args.train_file or args.dataset_name)
    if stores == files:
        raise ConfigError("give exactly one training source: --train_store, or --train_file / --dataset_name"
                          if not stores else "give --train_store or --train_file/--dataset_name, not both")
    if args.train_file and args.dataset_name:
        raise ConfigError("give --train_file or --dataset_name, not both")
    if stores and (args.validation_file or args.train_tokenizer):
        raise ConfigError("--validation_file and --train_tokenizer go with --train_file/--dataset_name; "
                          "with --train_store use --eval_store")
    if files and args.eval_store:
        raise ConfigError("--eval_store goes with --train_store; use --validation_file with --train_file")
    for flag in ("train_store", "train_file"):
        if getattr(args, flag):
            train_sources(getattr(args, flag), f"--{flag}")
    for flag in ("eval_store", "validation_file"):
        if getattr(args, flag):
            eval_sources(getattr(args, flag), f"--{flag}")
    if files and not (args.train_tokenizer or args.tokenizer_name or args.model_name_or_path):
        raise ConfigError("preparing text needs a tokenizer: --tokenizer_name, --model_name_or_path "
                          "or --train_tokenizer")
    if args.train_tokenizer:
        check_trained_vocab_size(args.vocab_size, "--vocab_size", error=ConfigError)
    if bool(args.model_name_or_path) == bool(args.config_name):
        raise ConfigError("give exactly one of --model_name_or_path (fine-tune) and --config_name (from scratch)")
    for name in ("block_size", "per_device_eval_batch_size", "num_train_epochs", "logging_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.task == "clm" and args.block_size < 2:
        raise ConfigError(f"--block_size must be >= 2 for clm (a block of n tokens holds n - 1 next-token "
                          f"targets), got {args.block_size}")
    for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.validation_split_percentage < 100:
        raise ConfigError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    if args.task == "mlm" and not 0 < args.mlm_probability < 1:
        raise ConfigError(f"--mlm_probability must be in (0, 1), got {args.mlm_probability}")
    if args.eval_stride is not None:
        if args.task != "clm":
            raise ConfigError("--eval_stride is for CLM perplexity; MLM evaluation uses fixed masks")
        if not 1 <= args.eval_stride <= args.block_size:
            raise ConfigError(f"--eval_stride must be in [1, block_size={args.block_size}], got {args.eval_stride}")
    if args.resume and not (Path(args.output_dir) / "checkpoints" / "latest").is_file():
        raise ConfigError(f"--resume: no checkpoint in {Path(args.output_dir) / 'checkpoints'} (no 'latest' file)")
