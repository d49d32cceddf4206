"""Train a causal-LM or masked-LM head on packed blocks from a token store with DeepSpeed; report perplexity.

With no arguments it is the offline demo: it prepares the stdlib's pydoc_data.topics text, trains a
byte-level BPE tokenizer on it, trains a tiny GPT for a minute or two on CPU and prints the held-out
perplexity (outputs under runs/demo).

Launch it any of these ways (the arguments are the same):

    python -m fastlm.run                                       # the offline demo
    python -m fastlm.run --task clm --train_store S --config_name gpt2-tiny --output_dir runs/x
    fastlm train --task mlm --train_file train.txt --validation_file valid.txt \\
        --model_name_or_path distilroberta-base --output_dir runs/mlm
    deepspeed fastlm/run.py --task clm --model_name_or_path distilgpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --output_dir runs/clm
    deepspeed --num_gpus 2 fastlm/run.py ... --zero_stage 2          # one node, 2 GPUs (2 CPU ranks: set
                                                                     # OMP_NUM_THREADS=1 on a 2-core box)
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 fastlm/run.py ... --zero_stage 3
        # hostfile lines "worker-1 slots=8"; every node needs the same checkout and data paths
    torchrun --nproc_per_node 2 fastlm/run.py ...
    deepspeed fastlm/run.py ... --deepspeed ds_config.json    # a DeepSpeed JSON merged with the flags

The loop is the DeepSpeed one: engine(batch) -> engine.backward(loss) -> engine.step(). Rank 0 logs and
writes <output_dir>/metrics.jsonl, results.json, loss.png, the final model and tokenizer (model/, loadable
with from_pretrained) and DeepSpeed checkpoints (checkpoints/, with the data position and RNG state in
client_state so --resume continues exactly). Perplexity is exp(sum of token NLL / number of target
tokens), both summed over ranks and batches.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed fastlm/run.py`, `torchrun fastlm/run.py`): Python put fastlm/ itself
    # first on sys.path, where data.py or tokenizer.py would shadow top-level modules; put the checkout
    # there instead, so `import fastlm` works even without `pip install -e .`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass

import numpy as np

from fastlm.tokenizer import MIN_TRAINED_VOCAB, TRAINED_SPECIAL_TOKEN, padding_id, special_ids
from fastlm.tokenizer import vocab_size as tokenizer_vocab_size

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

# Dense bf16 peak FLOP/s for MFU, by substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


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
    train_store: str = dataclasses.field(default=None, **_help("token store made by `fastlm prepare`"))
    eval_store: str = dataclasses.field(default=None, **_help("evaluation token store"))
    train_file: str = dataclasses.field(default=None, **_help("text/json/csv file, prepared into --cache_dir"))
    validation_file: str = dataclasses.field(default=None, **_help("evaluation text/json/csv file"))
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


def _parser(suppress_defaults=False):
    parser = argparse.ArgumentParser(
        prog="fastlm train", description=__doc__.split("\n\n")[0], conflict_handler="resolve",
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
    args, explicit, _ = _parse(argv)
    return args, explicit


def _parse(argv):
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
    precision = _resolve_precision(args.precision, device_type)
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
            # torch's AdamW on CPU: DeepSpeed's FusedAdam would JIT-compile a CUDA/C++ op first.
            **({"torch_adam": True} if cpu else {})}},
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


def _resolve_precision(precision, device_type):
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
    if files and not (args.train_tokenizer or args.tokenizer_name or args.model_name_or_path):
        raise ConfigError("preparing text needs a tokenizer: --tokenizer_name, --model_name_or_path "
                          "or --train_tokenizer")
    if args.train_tokenizer and args.vocab_size < MIN_TRAINED_VOCAB:
        raise ConfigError(f"--vocab_size must be >= {MIN_TRAINED_VOCAB} for --train_tokenizer (256 byte tokens + "
                          f"{TRAINED_SPECIAL_TOKEN}), got {args.vocab_size}")
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


# --- distributed set-up -------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_env():
    """(rank, world_size, local_rank); plain `python` gets single-process defaults, which
    deepspeed.init_distributed needs (it otherwise tries MPI discovery and fails)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _device_type():
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


# --- data ---------------------------------------------------------------------------------------------

def _cache_key(args):
    """Prepared stores are reused while the sources and preparation settings are unchanged."""
    sources = []
    for name in (args.train_file, args.validation_file):
        if name:
            st = Path(name).stat()
            sources.append([str(Path(name).resolve()), st.st_size, st.st_mtime_ns])
    tokenizer = args.tokenizer_name or args.model_name_or_path
    key = [sources, args.dataset_name, args.dataset_config_name, tokenizer, args.train_tokenizer,
           args.vocab_size if args.train_tokenizer else None, args.doc_boundary]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _open_or_prepare(args, rank):
    """(train store, eval store or None). With text sources, rank 0 prepares them into the cache while
    the other ranks wait at a barrier, then everyone opens the same stores."""
    from fastlm.store import TokenStore

    if args.train_store:
        return TokenStore.open(args.train_store), (TokenStore.open(args.eval_store) if args.eval_store else None)
    cache = Path(args.cache_dir or Path(args.output_dir) / "data") / _cache_key(args)
    train_dir, eval_dir = cache / "train", cache / "validation"
    failure = [None]
    if rank == 0:
        try:
            _prepare_into(args, train_dir, eval_dir)
        except Exception as error:
            failure = [f"{type(error).__name__}: {error}"]
            _share(failure)
            raise
    _share(failure)  # the others wait here: a barrier that also tells them when rank 0 failed
    if failure[0]:
        raise RuntimeError(f"rank 0 could not prepare the data: {failure[0]}")
    return TokenStore.open(train_dir), (TokenStore.open(eval_dir) if eval_dir.is_dir() else None)


def _share(objects):
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.broadcast_object_list(objects, src=0)


def _prepare_into(args, train_dir, eval_dir):
    from fastlm.prepare import prepare
    from fastlm.store import TokenStore

    def ready(path):
        try:
            TokenStore.open(path)
            return True
        except ValueError:
            return False

    # Special tokens as the tutorial's tokenizer(...) call adds them (<s> ... </s> per RoBERTa document).
    # overwrite: only a store that failed to open is rebuilt (say a run killed while preparing).
    common = dict(doc_boundary=args.doc_boundary, add_special_tokens=True, progress=True, overwrite=True)
    if args.dataset_name:
        common.update(dataset_name=args.dataset_name, dataset_config=args.dataset_config_name)
    if not ready(train_dir):
        tokenizer = None if args.train_tokenizer else (args.tokenizer_name or args.model_name_or_path)
        sources = [args.train_file] if args.train_file else []
        print(f"[fastlm] preparing {sources or args.dataset_name} -> {train_dir}", flush=True)
        prepare(sources, train_dir, tokenizer=tokenizer, train_tokenizer=args.train_tokenizer,
                vocab_size=args.vocab_size if args.train_tokenizer else None,
                **common, **({"split": "train"} if args.dataset_name else {}))
    if ready(eval_dir):
        return
    # The evaluation text uses the training store's tokenizer (the trained one, with --train_tokenizer).
    tokenizer = str(TokenStore.open(train_dir).tokenizer_dir)
    if args.validation_file:
        prepare([args.validation_file], eval_dir, tokenizer=tokenizer, **common)
    elif args.dataset_name:
        try:
            prepare([], eval_dir, tokenizer=tokenizer, split="validation", **common)
        except (ValueError, KeyError):
            pass  # no validation split: --validation_split_percentage holds out train documents


def _eval_documents(args, train_store, eval_store):
    """((train tokens, offsets), (eval tokens, offsets) or None)."""
    from fastlm.data import split_documents

    train = (train_store.tokens, train_store.offsets)
    if eval_store is not None:
        return train, (eval_store.tokens, eval_store.offsets)
    if args.validation_split_percentage == 0:
        return train, None
    try:
        return split_documents(*train, args.validation_split_percentage / 100)
    except ValueError as error:
        raise ConfigError(f"--validation_split_percentage {args.validation_split_percentage}: {error}") from None


def _pack(args, tokens, offsets, tokenizer, *, stride=None):
    from fastlm import pack_blocks, pack_documents

    pad_id = padding_id(special_ids(tokenizer))
    if args.packing == "documents" and not stride:
        return pack_documents(tokens, offsets, args.block_size, pad_id=pad_id)
    separator = tokenizer.eos_token_id if args.separator == "eos" else None
    if args.separator == "eos" and separator is None:
        raise ConfigError("--separator eos: the tokenizer has no EOS token")
    # Strided evaluation keeps the final partial window so every token is scored, as HF's recipe does.
    remainder = "pad" if stride else "drop"
    return pack_blocks(tokens, offsets, args.block_size, separator=separator, stride=stride,
                       remainder=remainder, pad_id=pad_id)


def _masker(args, tokenizer):
    from fastlm.masking import Masker

    if tokenizer.mask_token_id is None:
        raise ConfigError("--task mlm needs a tokenizer with a mask token")
    return Masker.from_tokenizer(tokenizer, mlm_probability=args.mlm_probability, seed=args.seed)


# --- model --------------------------------------------------------------------------------------------

def _model_config(args, tokenizer):
    from transformers import AutoConfig, CONFIG_MAPPING

    if args.config_name in PRESETS:
        model_type, shape = PRESETS[args.config_name]
        specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        if model_type == "gpt2":
            extra = dict(n_positions=max(args.block_size, 1024 if args.config_name == "gpt2-124m" else 0))
        else:  # RoBERTa's positions start after the padding index
            extra = dict(max_position_embeddings=args.block_size + 2, type_vocab_size=1 if model_type == "roberta" else 2)
        specials = {k: v for k, v in specials.items() if v is not None}
        return CONFIG_MAPPING[model_type](vocab_size=tokenizer_vocab_size(tokenizer), **shape, **extra, **specials)
    return AutoConfig.from_pretrained(args.config_name)


def position_offset(config):
    """Where a model's position ids start: RoBERTa-style embeddings number positions after the padding
    index (HF's create_position_ids_from_input_ids), others from 0."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") and config.pad_token_id is not None:
        return config.pad_token_id + 1
    return 0


def _max_positions(config):
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return n - position_offset(config) if n else n


def _build_model(args, tokenizer, ds_config):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if args.task == "clm" else AutoModelForMaskedLM
    config = AutoConfig.from_pretrained(args.model_name_or_path) if args.model_name_or_path else _model_config(args, tokenizer)
    limit = _max_positions(config)
    if limit and args.block_size > limit:
        raise ConfigError(f"--block_size {args.block_size} exceeds the model's {limit} positions")
    # ZeRO-3 builds the model partitioned (deepspeed.zero.Init) only while an HfDeepSpeedConfig is
    # alive; without it from_config skips HF's weight init. The caller keeps it alive.
    keep_alive = transformers.integrations.HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    try:
        if args.model_name_or_path:
            model = auto.from_pretrained(args.model_name_or_path)
        else:
            model = auto.from_config(config)
    except ValueError as error:  # e.g. a GPT-2 config for --task mlm
        raise ConfigError(f"cannot build a {args.task} model from {args.model_name_or_path or args.config_name}: {error}") from None
    if tokenizer_vocab_size(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer_vocab_size(tokenizer))
    return model, keep_alive


def _param_groups(model, weight_decay):
    """AdamW decays matrices only: biases and norm weights are 1-D (nanoGPT's rule)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # under ZeRO-3 p.shape is the empty local partition
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flops_per_token(model, block_size):
    """6N for the matmuls of forward + backward, plus attention's 12 * layers * width * context (PaLM)."""
    config = model.config
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    return 6 * n + 12 * layers * width * block_size


def model_inputs(batch, config, *, task, dtype):
    """The model's keyword arguments for a batch of tensors. Batches of whole documents packed together
    (only pack_documents gives position_ids) get attention that stops at document boundaries.

    Causal LMs: transformers 5 finds the documents from position_ids restarting at 0
    (masking_utils.find_packed_sequence_indices), but only with no attention_mask and no KV cache, so
    both go. The padding after the last document has position 0 and label -100: each pad token is a
    one-token document of its own, attended by nothing else.
    Encoders (RoBERTa, BERT): create_bidirectional_mask ignores position_ids, so they get a 4-D
    block-diagonal mask from transformers' own mask builder (a 4-D mask is used as given), in the
    form the model's attention implementation (sdpa, eager) expects. Position ids that all start at
    an offset (RoBERTa's padding_idx + 1) mark documents the same way.
    Limitation: with flash attention (not the runner's default) the 4-D mask is not used.
    """
    if "position_ids" not in batch:
        return batch
    import torch
    from transformers.masking_utils import (create_bidirectional_mask, find_packed_sequence_indices,
                                            packed_sequence_mask_function)

    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    if task == "clm":
        return {**inputs, "use_cache": False}  # GPT-2's config says use_cache=True
    documents = find_packed_sequence_indices(batch["position_ids"])
    if documents is None:  # one document a row, no padding: the plain mask is right
        return batch
    shape_only = torch.empty(*batch["input_ids"].shape, 0, dtype=dtype, device=batch["input_ids"].device)
    inputs["attention_mask"] = create_bidirectional_mask(
        config, shape_only, None, and_mask_function=packed_sequence_mask_function(documents))
    return inputs


# --- evaluation ---------------------------------------------------------------------------------------

def perplexity(nll_sum, n_targets):
    """exp(mean token NLL); inf when it overflows a float."""
    if n_targets <= 0:
        raise ValueError("perplexity over zero target tokens is undefined")
    try:
        return math.exp(nll_sum / n_targets)
    except OverflowError:
        return math.inf


def token_nll(logits, labels, *, shift):
    """(sum of token negative log-likelihoods in float64, number of target tokens) of one batch.

    CLM predicts token t+1 from position t (shift=True), as HF's models do with `labels`; MLM scores
    each masked position in place. Logits are upcast to float32 like HF's loss.
    """
    import torch.nn.functional as F

    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll.double(), (labels != -100).sum()


def evaluate(engine, blocks, *, args, rank, world_size, masker=None):
    """Token-weighted evaluation over all ranks: {"eval_loss", "perplexity", "eval_tokens"}."""
    import torch
    import torch.distributed as dist

    from fastlm.data import eval_batches

    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    config, dtype = engine.module.config, engine.module.dtype
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        for batch, counts in eval_batches(blocks, batch_size=args.per_device_eval_batch_size, rank=rank,
                                          world_size=world_size, masker=masker,
                                          position_offset=position_offset(engine.module.config)):
            batch = {k: torch.from_numpy(v).to(engine.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = engine(**model_inputs(batch, config, task=args.task, dtype=dtype)).logits
            if counts:
                nll, n = token_nll(logits, labels, shift=args.task == "clm")
                totals[0] += nll
                totals[1] += n
    if was_training:
        engine.train()
    if world_size > 1:
        dist.all_reduce(totals)
    nll_sum, n_targets = totals.tolist()
    if not n_targets:  # e.g. one-token documents packed whole: report it, don't fail after the training
        return {"eval_loss": math.nan, "perplexity": math.nan, "eval_tokens": 0}
    return {"eval_loss": nll_sum / n_targets, "perplexity": perplexity(nll_sum, n_targets),
            "eval_tokens": int(n_targets)}


# --- outputs ------------------------------------------------------------------------------------------

def _write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_metrics(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot_losses(metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _save_model(engine, tokenizer, directory, rank):
    """save_pretrained into directory, atomically; ZeRO-3 first gathers the partitioned weights (every
    rank takes part)."""
    from fastlm.store import _replace_directory

    state_dict = None
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _replace_directory(tmp, directory, overwrite=True)  # the old model goes only once the new one is in place


def _rng_state():
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run ------------------------------------------------------------------------------------------

def main(argv=None):
    """The command line (`python -m fastlm.run`, `fastlm train`): train, then return exit status 0.
    Bad configurations exit with status 2 and one message."""
    train(argv)
    return 0


def train(argv=None):
    """Train from command-line arguments (sys.argv[1:] by default; none at all = the offline demo).
    Returns results.json's content on rank 0 (None on other ranks)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print("[fastlm] no arguments: the offline demo. Training a tiny GPT on the stdlib's pydoc topics "
              f"(about 2 minutes on 2 CPU cores; outputs in {DEMO_DIR}). `--help` lists the runner's flags.",
              flush=True)
        argv = demo_argv()
    _device_type()  # sets DS_ACCELERATOR=cpu before deepspeed is first imported, when there is no GPU
    args, explicit, parser = _parse(argv)
    try:
        return _run(args, explicit)
    except ConfigError as error:
        parser.error(str(error))


def _run(args, explicit):
    check_args(args)
    rank, world_size, local_rank = _distributed_env()
    device_type = _device_type()
    # Config errors come before anything starts (no process group, no data, no model yet).
    ds_config = build_ds_config(args, world_size=world_size, device_type=device_type, explicit=explicit)

    import deepspeed
    import torch
    from deepspeed.utils import logger as ds_logger
    from transformers import AutoTokenizer

    ds_logger.setLevel("WARNING")
    start_time = time.time()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    train_store, eval_store = _open_or_prepare(args, rank)
    tokenizer = AutoTokenizer.from_pretrained(train_store.tokenizer_dir)
    (train_tokens, train_offsets), eval_docs = _eval_documents(args, train_store, eval_store)
    train_blocks = _pack(args, train_tokens, train_offsets, tokenizer)
    eval_blocks = _pack(args, *eval_docs, tokenizer, stride=args.eval_stride) if eval_docs else None
    masker = _masker(args, tokenizer) if args.task == "mlm" else None
    if eval_blocks is not None and len(eval_blocks) == 0:
        raise ConfigError(f"the evaluation set is shorter than one block of {args.block_size} tokens")

    per_rank = len(train_blocks) // (args.per_device_train_batch_size * world_size)
    steps_per_epoch = per_rank // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(train_blocks)} blocks of {args.block_size} tokens: fewer than one "
            f"optimizer step ({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x "
            f"{world_size} ranks); use a smaller batch or block size or more data")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs

    model, zero3_context = _build_model(args, tokenizer, ds_config)
    flops_per_token = _flops_per_token(model, args.block_size)
    schedule = None
    if "scheduler" not in ds_config:
        factor = lr_schedule(args, total_steps)
        schedule = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # noqa: E731
    engine, *_ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, args.weight_decay),
                                      config=ds_config, lr_scheduler=schedule)
    del model
    ckpt_dir = out / "checkpoints"
    state = {"step": 0, "epoch": 0, "next_batch": 0, "tokens_seen": 0, "train_loss_sum": 0.0,
             "train_loss_count": 0, "window": [0.0, 0, 0]}
    layout = _data_layout(args, world_size=world_size, n_blocks=len(train_blocks))
    if args.resume:
        _, client_state = engine.load_checkpoint(str(ckpt_dir))
        _check_same_layout(client_state.get("layout"), layout)
        state.update({k: client_state[k] for k in state})
        _set_rng_state(client_state["rng"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        # A resumed run rewrites history from its checkpoint on, so the file never holds two futures.
        kept = [m for m in _read_metrics(metrics_path) if m["step"] <= state["step"]] if args.resume else []
        tmp = Path(f"{metrics_path}.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, metrics_path)

    seen, stats = _train(engine, args, train_blocks, eval_blocks, masker, state, total_steps=total_steps,
                   rank=rank, world_size=world_size, device_type=device_type, metrics_path=metrics_path,
                   ckpt_dir=ckpt_dir, flops_per_token=flops_per_token, layout=layout)

    final_eval = evaluate(engine, eval_blocks, args=args, rank=rank, world_size=world_size, masker=masker) if eval_blocks else {}
    ranks = _rank_report(seen, final_eval.get("eval_loss"), world_size=world_size, device=engine.device)
    _save_model(engine, tokenizer, out / "model", rank)
    results = None
    if rank == 0:
        if final_eval:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": state["step"], **final_eval}) + "\n")
        results = {
            "task": args.task, "steps": state["step"], "epochs": state["step"] / steps_per_epoch,
            "train_loss": state["train_loss_sum"] / max(state["train_loss_count"], 1),
            **final_eval, "tokens_seen": state["tokens_seen"], "train_blocks": len(train_blocks),
            "eval_blocks": len(eval_blocks) if eval_blocks else 0, "world_size": world_size,
            "precision": args.precision, "zero_stage": args.zero_stage, **stats, "ranks": ranks,
            "wall_time_s": time.time() - start_time,
        }
        _write_json(out / "results.json", results)
        _plot_losses(_read_metrics(metrics_path), out / "loss.png")
        if final_eval:
            print(f"[fastlm] eval loss {final_eval['eval_loss']:.4f}  perplexity {final_eval['perplexity']:.2f} "
                  f"over {final_eval['eval_tokens']} tokens; outputs in {out}", flush=True)
    del zero3_context
    _shutdown(world_size)
    return results


def _data_layout(args, *, world_size, n_blocks):
    """What a checkpoint's data position (epoch, micro batch) counts in: the same position means the
    same batches only with the same shuffle seed, blocks, micro batch, accumulation and rank count."""
    return {"per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": world_size,
            "seed": args.seed, "block_size": args.block_size, "packing": args.packing, "train_blocks": n_blocks}


def _check_same_layout(saved, now):
    if saved is None:
        raise ConfigError("--resume: the checkpoint does not record its data layout (batch sizes, ranks, seed, "
                          "blocks), so its data position cannot be trusted; start a new run")
    changed = [f"{name} {saved.get(name)} -> {value}" for name, value in now.items() if saved.get(name) != value]
    if changed:
        raise ConfigError(f"--resume: the checkpoint's data position belongs to another data layout "
                          f"({', '.join(changed)}); resume with the settings it was saved with or start a new run")


def _train(engine, args, train_blocks, eval_blocks, masker, state, *, total_steps, rank, world_size,
           device_type, metrics_path, ckpt_dir, flops_per_token, layout):
    """The loop; advances `state` (the resumable position) and returns this run's throughput."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from fastlm.data import TrainBatches

    accum = args.gradient_accumulation_steps
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0 or args.disable_tqdm,
               desc=f"{args.task} train", dynamic_ncols=True)
    log = _Logger(engine, args, state, rank=rank, world_size=world_size, metrics_path=metrics_path, bar=bar,
                  flops_per_token=flops_per_token, device_type=device_type)
    first_step, data_time, step_time, startup_time, tokens = state["step"], 0.0, 0.0, 0.0, 0
    # Which blocks this rank trained on in its first epoch: summed over ranks it shows the shares are disjoint.
    first_epoch, seen = state["epoch"], np.zeros(len(train_blocks), dtype=np.int32)
    config, dtype = engine.module.config, engine.module.dtype
    engine.train()
    while state["step"] < total_steps:
        dataset = TrainBatches(train_blocks, micro_batch=args.per_device_train_batch_size, accumulation=accum,
                               rank=rank, world_size=world_size, epoch=state["epoch"], seed=args.seed, masker=masker,
                               position_offset=position_offset(engine.module.config))
        if state["next_batch"] >= len(dataset):  # the loop below would then spin without a step
            raise RuntimeError(f"epoch {state['epoch']} has {len(dataset)} micro batches for rank {rank}; "
                               f"none left from micro batch {state['next_batch']} on")
        # A private generator for worker seeds: drawing them from the global torch RNG would shift the
        # dropout stream between a resumed and an uninterrupted run.
        loader = DataLoader(dataset, batch_size=None, sampler=range(state["next_batch"], len(dataset)),
                            num_workers=args.dataloader_num_workers, pin_memory=device_type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        j, start = state["next_batch"], state["next_batch"]
        fetch_start = time.perf_counter()
        for batch in loader:
            t0 = time.perf_counter()
            # The first fetch of an epoch includes starting the workers: a one-off, reported on its own.
            if j == start:
                startup_time += t0 - fetch_start
            else:
                data_time += t0 - fetch_start
            n_tokens = int(batch["attention_mask"].sum())
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            loss = engine(**model_inputs(batch, config, task=args.task, dtype=dtype)).loss
            engine.backward(loss)
            if (j + 1) % accum == 0 and log.due(state["step"] + 1, total_steps) and _unscaled_plain_grads(engine):
                log.grad_norm = _grad_norm(engine.module)  # DeepSpeed reports none on this path
            engine.step()
            log.add(loss.detach(), n_tokens)
            tokens += n_tokens
            if dataset.epoch == first_epoch:
                seen[dataset.indices(j)] = 1
            j += 1
            if j % accum == 0:
                state["step"] += 1
                state["epoch"], state["next_batch"] = (state["epoch"] + 1, 0) if j == len(dataset) else (state["epoch"], j)
                log.step_done(total_steps)
                if eval_blocks is not None and args.eval_steps and state["step"] % args.eval_steps == 0 \
                        and state["step"] != total_steps:
                    log.write(evaluate(engine, eval_blocks, args=args, rank=rank, world_size=world_size, masker=masker))
                if args.save_steps and state["step"] % args.save_steps == 0:
                    engine.save_checkpoint(str(ckpt_dir), tag=f"step{state['step']}",
                                           client_state={**state, "rng": _rng_state(), "layout": layout})
            step_time += time.perf_counter() - t0
            if state["step"] >= total_steps:
                break
            fetch_start = time.perf_counter()
    bar.close()
    steps = state["step"] - first_step
    loop_time = data_time + step_time + startup_time
    return seen, {"data_time_fraction": data_time / (data_time + step_time) if steps else 0.0,
                  "dataloader_startup_s": startup_time,
                  "train_steps_per_s": steps / loop_time if steps else 0.0,
                  "train_tokens_per_s_per_rank": tokens / loop_time if steps else 0.0}


def _sum_over_ranks(values, *, dtype, device, world_size):
    """`values` summed elementwise over all ranks, returned on the CPU. The tensor is built on `device`
    (the engine's): on GPUs the process group is NCCL, which cannot reduce CPU tensors."""
    import torch
    import torch.distributed as dist

    totals = torch.as_tensor(values, dtype=dtype, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    return totals.cpu()


def _rank_report(seen, eval_loss, *, world_size, device):
    """Cross-rank checks for results.json: blocks trained in the first epoch of this run, how many of them
    more than one rank trained on (0 when the shares are disjoint), and each rank's final eval loss."""
    import torch
    import torch.distributed as dist

    counts = _sum_over_ranks(seen, dtype=torch.int32, device=device, world_size=world_size)
    losses = [eval_loss]
    if world_size > 1:
        losses = [None] * world_size
        dist.all_gather_object(losses, eval_loss)
    return {"blocks_trained": int((counts > 0).sum()), "overlapping_blocks": int((counts > 1).sum()),
            "eval_loss": losses}


def _unscaled_plain_grads(engine):
    """ZeRO-0 in fp32: DeepSpeed clips with torch and keeps no norm; every gradient is whole and local."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def _grad_norm(module):
    import torch

    norms = [p.grad.detach().norm(2) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


class _Logger:
    """Sums micro-batch losses and tokens between log lines; every `logging_steps` optimizer steps it
    all-reduces them across ranks and rank 0 appends a line to metrics.jsonl. The running sums live in
    `state`, so a checkpoint between two log lines resumes them too."""

    def __init__(self, engine, args, state, *, rank, world_size, metrics_path, bar, flops_per_token, device_type):
        import torch

        self.engine, self.args, self.state, self.rank, self.world_size = engine, args, state, rank, world_size
        self.metrics_path, self.bar, self.flops_per_token = metrics_path, bar, flops_per_token
        self.loss = torch.zeros((), dtype=torch.float64, device=engine.device)  # on device: no sync per micro batch
        self.peak = None
        if device_type == "cuda":
            name = torch.cuda.get_device_name()
            self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.since = time.perf_counter()
        self.grad_norm = None

    def due(self, step, total_steps):
        return step % self.args.logging_steps == 0 or step == total_steps

    def add(self, loss, n_tokens):
        self.loss += loss.double()
        self.state["window"][1] += 1
        self.state["window"][2] += n_tokens

    def step_done(self, total_steps):
        import torch

        step = self.state["step"]
        if self.rank == 0:
            self.bar.update(1)
        # One host sync per optimizer step (not per micro batch), so a checkpoint holds the window exactly.
        self.state["window"][0] += self.loss.item()
        self.loss.zero_()
        if not self.due(step, total_steps):
            return
        totals = _sum_over_ranks(self.state["window"], dtype=torch.float64, device=self.engine.device,
                                 world_size=self.world_size)
        loss_sum, n_micro, tokens = totals.tolist()
        seconds = time.perf_counter() - self.since
        self.state["tokens_seen"] += int(tokens)
        self.state["train_loss_sum"] += loss_sum
        self.state["train_loss_count"] += int(n_micro)
        record = {"step": step, "epoch": self.state["epoch"], "loss": loss_sum / n_micro,
                  "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / seconds, "tokens_seen": self.state["tokens_seen"]}
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm, self.grad_norm = (self.grad_norm if grad_norm is None else grad_norm), None
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens / seconds / (self.peak * self.world_size)
        self.write(record)
        if self.rank == 0:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.state["window"] = [0.0, 0, 0]
        self.since = time.perf_counter()

    def write(self, record):
        if self.rank == 0:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": self.state["step"], **record}) + "\n")


def _shutdown(world_size):
    """With several ranks, torch's gloo can abort at interpreter exit after a clean run (SIGABRT in
    1-4 of 10 runs): leave the process group in order and exit without running the interpreter's
    teardown."""
    if world_size == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- the offline demo ---------------------------------------------------------------------------------

DEMO_DIR = Path("runs/demo")


def demo_argv(output_dir=DEMO_DIR, max_steps=300):
    """Arguments of the offline demo, after writing its corpus: every pydoc topic as one document (a
    line: the topics' own newlines become spaces) from the stdlib, so every machine has it."""
    from pydoc_data.topics import topics

    output_dir = Path(output_dir)
    corpus = output_dir / "pydoc_topics.txt"
    if not corpus.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = corpus.with_suffix(".tmp")
        tmp.write_text("".join(" ".join(text.split()) + "\n" for _, text in sorted(topics.items())), encoding="utf-8")
        os.replace(tmp, corpus)
    return ["--task", "clm", "--train_file", str(corpus), "--train_tokenizer", "--vocab_size", "4096",
            "--config_name", "gpt2-mini", "--block_size", "128", "--separator", "eos",
            "--validation_split_percentage", "10", "--per_device_train_batch_size", "16",
            "--learning_rate", "2e-3", "--weight_decay", "0.01", "--warmup_steps", "30",
            "--lr_scheduler_type", "cosine", "--max_steps", str(max_steps), "--logging_steps", "10",
            "--eval_steps", "100",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir)]


if __name__ == "__main__":
    sys.exit(main())
