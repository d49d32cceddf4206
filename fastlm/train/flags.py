"""The runner's command line: every flag it takes (its own, run_clm.py / run_mlm.py / TrainingArguments'
spellings, DeepSpeed's), parsed into plain values. Translating HF's spellings is hf_flags.translate; the
checks and the typed configuration are in config.py.
"""
import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed

from fastlm.train import hf_flags
from fastlm.train.errors import fail, is_rank0
from fastlm.train.model import PRESETS

TASKS = ("auto", "clm", "mlm")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# transformers' get_scheduler names. reduce_lr_on_plateau and greedy step on evaluation metrics, which the
# DeepSpeed engine never hands its scheduler.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
PACKINGS = ("blocks", "documents")
STRATEGIES = ("no", "steps", "epoch")
DTYPES = ("auto", "bfloat16", "float16", "float32")

def _help(text, **extra):
    return dict(metadata=dict(help=text, **extra))


@dataclass
class Flags:
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
    block_size: int = dataclasses.field(default=None, **_help(
        "tokens per block (run_mlm: --max_seq_length); default as run_clm/run_mlm: the tokenizer's model_max_length, "
        "at most 1024 (and the model's positions)", aliases=("--max_seq_length",)))
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
    learning_rate: float = dataclasses.field(default=5e-5, **_help(
        "peak learning rate (AdamW's; with --optim muon also Muon's, in AdamW's units, unless --muon_lr)"))
    weight_decay: float = dataclasses.field(default=0.0, **_help(
        "decoupled weight decay, AdamW's and Muon's (not on biases/norms)"))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = dataclasses.field(default="adamw_torch", **_help(
        f"the optimizer: AdamW ({', '.join(hf_flags.ADAMW)}), or muon: Muon for the transformer blocks' "
        "matrices, AdamW for embeddings, LM head, norms and biases (docs/muon.md)"))
    muon_lr: float = dataclasses.field(default=None, **_help(
        "--optim muon: the Muon matrices' peak learning rate, in AdamW's units (default: --learning_rate)"))
    muon_momentum: float = dataclasses.field(default=0.95, **_help("--optim muon: Muon's (Nesterov) momentum"))
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
    torch_compile: bool = dataclasses.field(default=False, **_help(
        "torch.compile the model's transformer (the loss heads stay eager); pays on GPUs, not on small CPU models"))
    torch_compile_backend: str = dataclasses.field(default=None, **_help("torch.compile's backend (default: inductor)"))
    torch_compile_mode: str = dataclasses.field(default=None, **_help("torch.compile's mode, e.g. max-autotune"))
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
    report_to: str = dataclasses.field(default="none", **_help(
        "experiment trackers: wandb, mlflow, trackio, tensorboard, all (every one installed) or none", nargs="+"))
    run_name: str = dataclasses.field(default=None, **_help("the run's name in wandb, mlflow and trackio"))
    project: str = dataclasses.field(default="huggingface", **_help("the trackio project (wandb: $WANDB_PROJECT)"))
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


def _str_to_bool(text):
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in hf_flags.TRUTHY or value in hf_flags.FALSY - {"none", ""}:
        return value in hf_flags.TRUTHY
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage and error (an unknown flag) print once: every rank of a launch parses the same
    command line, and the ranks other than 0 exit with the same status without a word."""

    def error(self, message):
        if not is_rank0():
            fail(message, 2)  # silent here, after rank 0 has had time to print
        super().error(message)


def _parser(suppress_defaults=False):
    parser = _Parser(
        prog="fastlm train", description=DESCRIPTION, conflict_handler="resolve",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    for f in dataclasses.fields(Flags):
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
    deepspeed.add_config_arguments(parser)
    # DeepSpeed's --deepspeed is a bare flag; HF Trainer users pass `--deepspeed cfg.json`: take both.
    parser.add_argument("--deepspeed", nargs="?", const=None, metavar="CFG_JSON",
                        help="a DeepSpeed JSON config merged with these flags (same as --deepspeed_config)",
                        **({} if suppress_defaults else {"default": None}))
    return parser


def parse(argv):
    """(flag values as a dict, HF flags the runner does not implement {name: value}, the names the user set
    explicitly, the parser).

    `run_clm.py args.json` form: a single .json argument holds the flags. Unknown flags exit with status 2 and
    argparse's usage (the one case where the usage helps)."""
    argv = _json_argv(argv)
    parser = _parser()
    namespace, rest = parser.parse_known_args(argv)
    _refuse_unknown(parser, rest)
    explicit = set(vars(_parser(suppress_defaults=True).parse_known_args(argv)[0]))
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(Flags)}
    values["deepspeed"] = namespace.deepspeed or namespace.deepspeed_config
    foreign = {key.split(":", 1)[1]: value for key, value in vars(namespace).items() if key.startswith("foreign:")}
    return values, foreign, frozenset(explicit), parser


def _json_argv(argv):
    if len(argv) != 1 or not argv[0].endswith(".json"):
        return argv
    path = Path(argv[0])
    try:
        flags = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        fail(f"{path}: cannot read the arguments file ({error})", 2)
    if not isinstance(flags, dict):
        fail(f"{path}: an arguments file holds one JSON object of flag: value", 2)
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
