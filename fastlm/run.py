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
writes <output_dir>/metrics.jsonl, results.json, loss.png, the final model and tokenizer (at output_dir itself, loadable
with from_pretrained) and DeepSpeed checkpoints (checkpoints/, with the data position and RNG state in
client_state so --resume continues exactly). Perplexity is exp(sum of token NLL / number of target
tokens), both summed over ranks and batches.

This file is the launch and the loop. The flags, their checks and the DeepSpeed config are in
fastlm/config.py; the data plan (sources, stores, packing, sample order) in fastlm/data.py; the model in
fastlm/model.py; evaluation in fastlm/evaluation.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed fastlm/run.py`, `torchrun fastlm/run.py`): Python put fastlm/ itself
    # first on sys.path, where data.py or tokenizer.py would shadow top-level modules; put the checkout
    # there instead, so `import fastlm` works even without `pip install -e .`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import datetime
import hashlib
import json
import math
import os
import random
import shutil
import socket
import time

import numpy as np

from fastlm import outputs
from fastlm.config import (LENGTH_FLAGS, RESULT_FLAGS, ConfigError, Intervals, build_ds_config, check_args,
                           check_lr_schedule, lr_schedule, parse, resume_point, resume_settings)
from fastlm.data import (TrainBatches, first_blocks, make_masker, open_or_prepare, pack, rank0_then_others,
                         train_eval_documents)
from fastlm.evaluation import evaluate
from fastlm.model import build_model, flops_per_token, model_inputs, param_groups, position_offset
from fastlm.watchdog import RankWatchdog

PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

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


def _skip_deepspeed_shm_op():
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (25-45 s, more when another
    venv's build sits in the shared torch_extensions cache) in every init_distributed, but only
    inference_all_reduce uses it: training reduces through torch.distributed. Skip building it, and keep
    any op that does get compiled (a DeepSpeed JSON optimizer) in a cache of this venv's own."""
    import deepspeed  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


# --- outputs ------------------------------------------------------------------------------------------

def _read_json(path):
    """A JSON file's content, or {} when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


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
    """save_pretrained into directory (the output_dir, where run_clm.py leaves the model), staged in a
    temporary directory first; ZeRO-3 first gathers the partitioned weights (every rank takes part)."""
    state_dict = None
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    tmp = directory / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    outputs.publish_model(tmp, directory)


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
    started = time.perf_counter()
    _device_type()  # sets DS_ACCELERATOR=cpu before deepspeed is first imported, when there is no GPU
    args, explicit, parser = parse(argv)
    try:
        return _run(args, explicit, started)
    except ConfigError as error:
        parser.error(str(error))


def _run(args, explicit, started):
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
        if args.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    _skip_deepspeed_shm_op()
    # The watchdog names a stopped rank after --ddp_timeout; the process group's own timeout is only the
    # backstop behind it (gloo does not always honour it), so it comes later and says less.
    deepspeed.init_distributed(dist_backend=args.ddp_backend or ("gloo" if device_type == "cpu" else "nccl"),
                               timeout=datetime.timedelta(seconds=2 * args.ddp_timeout + 60))
    watchdog = RankWatchdog.start(args.ddp_timeout, rank=rank, world_size=world_size)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and args.do_train:
            outputs.clear_checkpoints(ckpt_dir)
    train_store, eval_store = open_or_prepare(args, rank)
    tokenizer = AutoTokenizer.from_pretrained((train_store or eval_store).tokenizer_dir)
    train_docs, eval_docs = train_eval_documents(args, train_store, eval_store)
    train_blocks = first_blocks(pack(args, *train_docs, tokenizer), args.max_train_samples) if args.do_train else None
    eval_blocks = None
    if eval_docs and args.do_eval:
        eval_blocks = first_blocks(pack(args, *eval_docs, tokenizer, stride=args.eval_stride), args.max_eval_samples)
    if args.do_eval and not args.do_train and eval_blocks is None:
        raise ConfigError("--do_eval alone evaluates a model: give an evaluation set (--validation_file, "
                          "--eval_store, or a training source with --validation_split_percentage)")
    masker = make_masker(args, tokenizer) if args.task == "mlm" else None
    if eval_blocks is not None and len(eval_blocks) == 0:
        raise ConfigError(f"the evaluation set is shorter than one block of {args.block_size} tokens")

    steps_per_epoch = total_steps = 0
    if args.do_train:
        per_rank = len(train_blocks) // (args.per_device_train_batch_size * world_size)
        steps_per_epoch = per_rank // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(train_blocks)} blocks of {args.block_size} tokens: fewer than one "
                f"optimizer step ({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x "
                f"{world_size} ranks); use a smaller batch or block size or more data")
        total_steps = args.max_steps or math.ceil(steps_per_epoch * args.num_train_epochs)
    intervals = Intervals(args, total_steps)

    layout = _data_layout(args, world_size=world_size, train_blocks=train_blocks,
                          train_store=train_store) if args.do_train else None
    settings = resume_settings(args)
    resume = args.resume and args.do_train
    resume_tag, universal = None, False
    if resume:  # checked before the model is built: another model shape would fail inside DeepSpeed
        resume_dir, resume_tag = resume_point(args)
        resume_tag = resume_tag or (resume_dir / "latest").read_text().strip()
        _check_resumable(_read_json(resume_dir / resume_tag / CHECKPOINT_SETTINGS), settings, layout, rank=rank)
        resume_tag, universal = _universal_if_resharded(resume_dir, resume_tag, world_size=world_size, rank=rank)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    schedule = None
    if "scheduler" not in ds_config:
        check_lr_schedule(args, max(total_steps, 1))
        schedule = lr_schedule(args, max(total_steps, 1))

    model, zero3_context = build_model(args, tokenizer, ds_config)
    token_flops = flops_per_token(model, args.block_size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay),
                                      config=ds_config, lr_scheduler=schedule)
    del model
    state = {"step": 0, "epoch": 0, "sample": 0, "tokens_seen": 0, "train_loss_sum": 0.0,
             "train_loss_count": 0, "window": [0.0, 0, 0]}
    if resume:
        _, client_state = engine.load_checkpoint(str(resume_dir), tag=resume_tag)
        if universal:  # a one-off bridge between rank counts; the run's own checkpoints are ordinary ones
            torch.distributed.barrier()  # every rank has read it
            rank0_then_others(lambda: shutil.rmtree(resume_dir / resume_tag), rank=rank,
                              what="remove the converted checkpoint")
        state.update({k: client_state[k] for k in state})
        _set_rng_state(client_state["rng"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        # A resumed run rewrites history from its checkpoint on, so the file never holds two futures.
        kept = [m for m in _read_metrics(metrics_path) if m["step"] <= state["step"]] if resume else []
        tmp = Path(f"{metrics_path}.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, metrics_path)

    board = outputs.open_tensorboard(args, out) if rank == 0 else None
    seen, stats = np.zeros(0, dtype=np.int32), {}
    if args.do_train:
        seen, stats = _train(engine, args, train_blocks, eval_blocks, masker, state, total_steps=total_steps,
                             rank=rank, world_size=world_size, device_type=device_type, metrics_path=metrics_path,
                             ckpt_dir=ckpt_dir, flops_per_token=token_flops, layout=layout, settings=settings,
                             intervals=intervals, started=started, board=board)

    eval_start = time.perf_counter()
    final_eval = evaluate(engine, eval_blocks, args=args, rank=rank, world_size=world_size, masker=masker) if eval_blocks else {}
    eval_runtime = time.perf_counter() - eval_start
    ranks = _rank_report(seen, final_eval.get("eval_loss"), world_size=world_size, device=engine.device)
    if args.do_train:
        _save_model(engine, tokenizer, out, rank)
    results = None
    if rank == 0:
        if final_eval:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": state["step"], **final_eval}) + "\n")
            if board:
                board.write({"step": state["step"], **final_eval})
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
        results = {
            "task": args.task, "steps": state["step"], "epochs": state["step"] / steps_per_epoch if steps_per_epoch else 0.0,
            "train_loss": state["train_loss_sum"] / max(state["train_loss_count"], 1),
            **final_eval, "tokens_seen": state["tokens_seen"], "train_blocks": len(train_blocks) if train_blocks else 0,
            "eval_blocks": len(eval_blocks) if eval_blocks else 0, "world_size": world_size,
            "precision": args.precision, "zero_stage": args.zero_stage, **stats, "ranks": ranks,
            "total_flos": float(token_flops * state["tokens_seen"]), "wall_time_s": time.time() - start_time,
        }
        outputs.write_json(out / "results.json", results)
        _write_hf_outputs(out, args, results, final_eval, intervals=intervals, eval_runtime=eval_runtime,
                          steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch,
                          metrics_path=metrics_path)
        if board:
            board.close()
        if final_eval:
            print(f"[fastlm] eval loss {final_eval['eval_loss']:.4f}  perplexity {final_eval['perplexity']:.2f} "
                  f"over {final_eval['eval_tokens']} tokens; outputs in {out}", flush=True)
    del zero3_context
    if watchdog:
        watchdog.stop()
    _shutdown(world_size)
    return results


def _write_hf_outputs(out, args, results, final_eval, *, intervals, eval_runtime, steps_per_epoch, total_steps,
                      global_batch, metrics_path):
    """Trainer's result files and trainer_state.json, for users comparing with run_clm.py / run_mlm.py."""
    train = evaluation = None
    if args.do_train:
        train = outputs.train_metrics(results, train_samples=results["train_blocks"], global_batch=global_batch)
        metrics = _read_metrics(metrics_path)
        outputs.write_trainer_state(out, outputs.trainer_state(
            metrics, args=args, results=results, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
            intervals=intervals))
        _plot_losses(metrics, out / "loss.png")
    if final_eval:
        n_batches = math.ceil(results["eval_blocks"] / args.per_device_eval_batch_size)
        evaluation = outputs.eval_metrics(final_eval, epoch=results["epochs"], eval_samples=results["eval_blocks"],
                                          runtime=eval_runtime, eval_steps=n_batches)
    outputs.write_hf_results(out, train=train, evaluation=evaluation)


def _universal_if_resharded(ckpt_dir, tag, *, world_size, rank):
    """(tag to load, whether it is in DeepSpeed's universal format).

    DeepSpeed cannot load optimizer state partitioned over another number of ranks (ZeRO 1-3, one
    *zero_pp_rank_* file per rank): such a checkpoint is first converted by rank 0 to DeepSpeed's
    universal format, which loads on any rank count. ZeRO-0 checkpoints hold whole state and load as they are.
    """
    shards = len(list((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    if shards in (0, world_size):
        return tag, False
    universal = f"{tag}_universal"

    def convert():
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint import ds_to_universal

        print(f"[fastlm] the checkpoint's optimizer state is split over {shards} ranks, this run has {world_size}: "
              f"converting {ckpt_dir / tag} to DeepSpeed's universal format", flush=True)
        tmp = ckpt_dir / f"{universal}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        options = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report is pages long
            ds_to_universal.main(options)
        shutil.rmtree(ckpt_dir / universal, ignore_errors=True)
        os.replace(tmp, ckpt_dir / universal)

    rank0_then_others(convert, rank=rank, what="convert the checkpoint to DeepSpeed's universal format")
    return universal, True


# Beside each DeepSpeed checkpoint: what --resume compares before anything is built (data layout, settings).
CHECKPOINT_SETTINGS = "fastlm.json"


def _save_checkpoint(engine, ckpt_dir, tag, state, *, layout, settings, rank):
    """A DeepSpeed checkpoint with the data position and RNG state in its client state. The settings file
    goes first: DeepSpeed's `latest` then never points at a checkpoint without one."""
    if rank == 0:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        outputs.write_json(ckpt_dir / tag / CHECKPOINT_SETTINGS, {"layout": layout, "settings": settings})
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "rng": _rng_state()})


def _data_layout(args, *, world_size, train_blocks, train_store):
    """What a checkpoint's data position (epoch, sample position) counts in: the blocks (by content and
    number) and how each optimizer step splits its global batch."""
    content = hashlib.sha256(json.dumps(train_store.meta.get("checksums"), sort_keys=True).encode()).hexdigest()
    return {"train_data": content, "train_blocks": len(train_blocks),
            "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": world_size}


def _check_resumable(saved, settings, layout, *, rank):
    """Refuse a checkpoint whose run computed something else; say what a changed layout or length does.

    Allowed: another split of the same global batch (micro batch x accumulation x ranks), which trains on
    the same samples in the same order; another global batch, which continues at the same sample
    position of the epoch (no sample skipped or repeated) with steps of another size; another training
    length. Refused: other training data, or any RESULT_FLAGS value.
    """
    saved_layout, saved_settings = saved.get("layout"), saved.get("settings")
    if saved_layout is None or saved_settings is None or "train_data" not in saved_layout:
        raise ConfigError("--resume: the checkpoint does not record its data layout and settings (it was "
                          "saved by an older fastlm), so its data position cannot be trusted; start a new run")
    if (saved_layout["train_data"], saved_layout["train_blocks"]) != (layout["train_data"], layout["train_blocks"]):
        raise ConfigError(f"--resume: the checkpoint was trained on other data ({saved_layout['train_blocks']} "
                          f"blocks, content {saved_layout['train_data'][:12]}; now {layout['train_blocks']} blocks, "
                          f"content {layout['train_data'][:12]}); resume on the same data or start a new run")
    changed = [f"--{name} {saved_settings.get(name)} -> {settings[name]}" for name in RESULT_FLAGS
               if saved_settings.get(name) != settings[name]]
    if changed:
        raise ConfigError(f"--resume: the checkpoint was saved with other settings ({', '.join(changed)}); resume "
                          "with the settings it was saved with, or start a new run (--output_dir elsewhere)")
    if rank != 0:
        return
    lengths = [f"--{name} {saved_settings.get(name)} -> {settings[name]}" for name in LENGTH_FLAGS
               if saved_settings.get(name) != settings[name]]
    if lengths:
        print(f"[fastlm] resuming with another training length ({', '.join(lengths)}): the learning-rate "
              "schedule now ends at the new last step", flush=True)
    split = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
    was = " x ".join(str(saved_layout[k]) for k in split)
    now = " x ".join(str(layout[k]) for k in split)
    if saved_layout["global_batch"] != layout["global_batch"]:
        print(f"[fastlm] the global batch changed from {saved_layout['global_batch']} ({was}, micro x accumulation "
              f"x ranks) to {layout['global_batch']} ({now}): continuing at the checkpoint's sample position of the "
              "epoch, no sample skipped or repeated; steps from here hold another number of samples", flush=True)
    elif was != now:
        print(f"[fastlm] resuming with micro batch x accumulation x ranks {now} (was {was}): the same global batch "
              f"of {layout['global_batch']}, so the same samples in the same order as the uninterrupted run", flush=True)


def _train(engine, args, train_blocks, eval_blocks, masker, state, *, total_steps, rank, world_size,
           device_type, metrics_path, ckpt_dir, flops_per_token, layout, settings, intervals, started, board=None):
    """The loop; advances `state` (the resumable position) and returns this run's throughput."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm


    accum = args.gradient_accumulation_steps
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0 or args.disable_tqdm,
               desc=f"{args.task} train", dynamic_ncols=True)
    log = _Logger(engine, args, state, rank=rank, world_size=world_size, metrics_path=metrics_path, bar=bar,
                  flops_per_token=flops_per_token, device_type=device_type, intervals=intervals, board=board)
    first_step, data_time, step_time, startup_time, tokens = state["step"], 0.0, 0.0, 0.0, 0
    # Which blocks this rank trained on in its first epoch: summed over ranks it shows the shares are disjoint.
    first_epoch, seen = state["epoch"], np.zeros(len(train_blocks), dtype=np.int32)
    config, dtype = engine.module.config, engine.module.dtype
    engine.train()
    while state["step"] < total_steps:
        dataset = TrainBatches(train_blocks, micro_batch=args.per_device_train_batch_size, accumulation=accum,
                               rank=rank, world_size=world_size, epoch=state["epoch"], seed=args.seed,
                               start=state["sample"], masker=masker, position_offset=position_offset(engine.module.config))
        if len(dataset) == 0:  # resumed with a larger global batch than the epoch has samples left
            if rank == 0:
                print(f"[fastlm] epoch {state['epoch']}: {len(train_blocks) - state['sample']} samples left, fewer "
                      f"than a global batch of {dataset.global_batch}; starting epoch {state['epoch'] + 1}", flush=True)
            state["epoch"], state["sample"] = state["epoch"] + 1, 0
            continue
        # A private generator for worker seeds: drawing them from the global torch RNG would shift the
        # dropout stream between a resumed and an uninterrupted run.
        loader = DataLoader(dataset, batch_size=None, num_workers=args.dataloader_num_workers,
                            pin_memory=device_type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        j = 0
        fetch_start = time.perf_counter()
        for batch in loader:
            t0 = time.perf_counter()
            # The first fetch of an epoch includes starting the workers: a one-off, reported on its own.
            if j == 0:
                startup_time += t0 - fetch_start
            else:
                data_time += t0 - fetch_start
            n_tokens = int(batch["attention_mask"].sum())
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            loss = engine(**model_inputs(batch, config, task=args.task, dtype=dtype)).loss
            engine.backward(loss)
            if (j + 1) % accum == 0 and log.due(state["step"] + 1, j + 1 == len(dataset)) and _unscaled_plain_grads(engine):
                log.grad_norm = _grad_norm(engine.module)  # DeepSpeed reports none on this path
            engine.step()
            log.add(loss.detach(), n_tokens)
            tokens += n_tokens
            if dataset.epoch == first_epoch:
                seen[dataset.indices(j)] = 1
            j += 1
            if j % accum == 0:
                state["step"] += 1
                epoch_end = j == len(dataset)
                state["epoch"], state["sample"] = ((state["epoch"] + 1, 0) if epoch_end
                                                   else (state["epoch"], dataset.end_position(j - 1)))
                log.step_done(epoch_end)
                if eval_blocks is not None and intervals.evaluate(state["step"], epoch_end):
                    log.write(evaluate(engine, eval_blocks, args=args, rank=rank, world_size=world_size, masker=masker))
                if intervals.save(state["step"], epoch_end):
                    _save_checkpoint(engine, ckpt_dir, f"step{state['step']}", state, layout=layout,
                                     settings=settings, rank=rank)
                    if rank == 0 and args.save_total_limit:
                        outputs.prune_checkpoints(ckpt_dir, args.save_total_limit)
            step_time += time.perf_counter() - t0
            if state["step"] >= total_steps:
                break
            fetch_start = time.perf_counter()
    bar.close()
    steps = state["step"] - first_step
    loop_time = data_time + step_time + startup_time
    return seen, {"data_time_fraction": data_time / (data_time + step_time) if steps else 0.0,
                  "dataloader_startup_s": startup_time, "train_runtime_s": loop_time,
                  "time_to_first_step_s": log.first_step_at - started if log.first_step_at else None,
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

    def __init__(self, engine, args, state, *, rank, world_size, metrics_path, bar, flops_per_token, device_type,
                 intervals, board=None):
        import torch

        self.engine, self.args, self.state, self.rank, self.world_size = engine, args, state, rank, world_size
        self.intervals, self.board, self.first_step_at = intervals, board, None
        self.metrics_path, self.bar, self.flops_per_token = metrics_path, bar, flops_per_token
        self.loss = torch.zeros((), dtype=torch.float64, device=engine.device)  # on device: no sync per micro batch
        self.peak = None
        if device_type == "cuda":
            name = torch.cuda.get_device_name()
            self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.since = time.perf_counter()
        self.grad_norm = None

    def due(self, step, epoch_end=False):
        return self.intervals.log(step, epoch_end)

    def add(self, loss, n_tokens):
        self.loss += loss.double()
        self.state["window"][1] += 1
        self.state["window"][2] += n_tokens

    def step_done(self, epoch_end=False):
        import torch

        step = self.state["step"]
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        if self.rank == 0:
            self.bar.update(1)
        # One host sync per optimizer step (not per micro batch), so a checkpoint holds the window exactly.
        self.state["window"][0] += self.loss.item()
        self.loss.zero_()
        if not self.due(step, epoch_end):
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
            record = {"step": self.state["step"], **record}
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board:
                self.board.write(record)


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