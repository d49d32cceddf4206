"""Train a causal-LM or masked-LM head on packed blocks from a token store with DeepSpeed; report perplexity.

With no arguments (or only the --local_rank a launcher adds) it is the offline demo: it prepares the
stdlib's pydoc_data.topics text, trains a byte-level BPE tokenizer on it, trains a tiny GPT for a minute
or two on CPU and prints the held-out perplexity (outputs under runs/demo in the working directory;
FASTLM_DEMO_STEPS=N shortens it to N steps).

Launch it any of these ways (the arguments are the same; without any, each runs the demo):

    python -m fastlm.run                                       # the offline demo
    deepspeed fastlm/run.py                                    # the demo through DeepSpeed's launcher
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
    deepspeed fastlm/run.py --model_name_or_path gpt2 --train_file train.txt --validation_file valid.txt \
        --per_device_train_batch_size 8 --do_train --do_eval --output_dir out   # a run_clm.py command, unchanged

The loop is the DeepSpeed one: engine(batch) -> engine.backward(loss) -> engine.step(), with token-weighted
steps: each optimizer step's gradient is that of (sum of token NLL over its micro batches and ranks) /
(its target tokens), whatever the micro batch, accumulation and rank count. config.Intervals says when
to log, evaluate and save (HF's *_strategy / *_steps flags). Rank 0 logs and writes
<output_dir>/metrics.jsonl, results.json, loss.png, the final model and tokenizer (at output_dir itself,
loadable with from_pretrained, as run_clm.py leaves them), HF's all/train/eval_results.json and
trainer_state.json, and DeepSpeed checkpoints (checkpoints/, with the data position and RNG state in
client_state so --resume continues exactly, and checksums that --resume verifies; --save_total_limit
keeps the newest). --do_eval alone evaluates without training. A non-finite loss or gradient norm stops
the run naming the step (exit status 1) before anything holds it. Perplexity is exp(sum of token NLL /
number of target tokens), both summed over ranks and batches.

This file is the launch and the loop. The flags, their checks and the DeepSpeed config are in
fastlm/config.py; the data plan (sources, stores, packing, sample order) in fastlm/data.py; the model in
fastlm/model.py; evaluation in fastlm/evaluation.py; checkpoints (save, verify, resume checks) in
fastlm/checkpoints.py; the HF-layout outputs in fastlm/outputs.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed fastlm/run.py`, `torchrun fastlm/run.py`): Python put fastlm/ itself
    # first on sys.path, where data.py or tokenizer.py would shadow top-level modules; put the checkout
    # there instead, so `import fastlm` works even without `pip install -e .`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import socket
import time

import numpy as np

from fastlm import outputs
from fastlm.checkpoints import (check_resumable, checkpoint_to_resume, data_layout, save_checkpoint, set_rng_state,
                                universal_if_resharded, verify_checkpoint)
from fastlm.config import (ConfigError, Intervals, build_ds_config, check_args, check_lr_schedule, lr_schedule, parse,
                           resume_point, resume_settings)
from fastlm.data import TrainBatches, check_token_ids, check_tokenizers, make_masker, open_or_prepare, plan, rank0_then_others
from fastlm.evaluation import evaluate_sets, row_nll
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


# --- the run ------------------------------------------------------------------------------------------

def main(argv=None):
    """The command line (`python -m fastlm.run`, `fastlm train`): train, then return exit status 0.
    Bad configurations exit with status 2 and one message; a diverged run with status 1."""
    try:
        train(argv)
    except Diverged as error:
        print(f"fastlm train: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def train(argv=None):
    """Train from command-line arguments (sys.argv[1:] by default; none at all, or only the
    `--local_rank` a launcher adds, = the offline demo). Returns results.json's content on rank 0 (None
    on other ranks); raises Diverged when the loss or gradient norm stops being finite."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _only_launcher_arguments(argv):
        argv += demo_argv()
        if os.environ.get("RANK", "0") == "0":
            print("[fastlm] no arguments: the offline demo. Training a tiny GPT on the stdlib's pydoc topics "
                  f"(about 2 minutes on 2 CPU cores; outputs in {DEMO_DIR.resolve()}). `--help` lists the "
                  "runner's flags.", flush=True)
    start_time = time.time()  # of wall_time_s and time_to_first_step_s: parsing imports DeepSpeed already
    _device_type()  # sets DS_ACCELERATOR=cpu before deepspeed is first imported, when there is no GPU
    args, explicit, parser = parse(argv)
    try:
        return _run(args, explicit, start_time)
    except ConfigError as error:
        parser.error(str(error))


def _only_launcher_arguments(argv):
    """Whether argv holds nothing but what a launcher adds: DeepSpeed's appends `--local_rank=N` (torchrun
    and `python -m` add nothing; they pass the rank in the environment)."""
    rest = list(argv)
    while rest[:1] == ["--local_rank"] or rest and rest[0].startswith("--local_rank="):
        rest = rest[2:] if rest[0] == "--local_rank" else rest[1:]
    return not rest


def _run(args, explicit, start_time):
    check_args(args)
    rank, world_size, local_rank = _distributed_env()
    device_type = _device_type()
    # Config errors come before anything starts (no process group, no data, no model yet).
    ds_config = build_ds_config(args, world_size=world_size, device_type=device_type, explicit=explicit)
    clip = _clipping_in_the_loop(ds_config, args)

    import deepspeed
    import torch
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
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
    stores = open_or_prepare(args, rank)
    check_tokenizers(stores)
    tokenizer = stores.load_tokenizer()
    # A Mixture of the training sources (None when the run only evaluates) and the evaluation sets
    train_blocks, eval_sets = plan(args, stores, tokenizer)
    masker = make_masker(args, tokenizer) if args.task == "mlm" else None

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

    layout = data_layout(args, world_size=world_size, train_blocks=train_blocks) if args.do_train else None
    settings = resume_settings(args)
    resume = args.resume and args.do_train
    resume_tag, universal = None, False
    if resume:  # checked before the model is built: another model shape would fail inside DeepSpeed
        resume_dir, resume_tag = resume_point(args)
        resume_tag, saved = checkpoint_to_resume(resume_dir, resume_tag)
        rank0_then_others(lambda: verify_checkpoint(resume_dir / resume_tag, saved.get("files")), rank=rank,
                          what="verify the checkpoint")
        check_resumable(saved, settings, layout, rank=rank)
        resume_tag, universal = universal_if_resharded(resume_dir, resume_tag, world_size=world_size, rank=rank)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    schedule = None
    if "scheduler" not in ds_config:
        check_lr_schedule(args, max(total_steps, 1))
        schedule = lr_schedule(args, max(total_steps, 1))

    model, zero3_context = build_model(args, tokenizer, ds_config)
    check_token_ids(stores, model.get_input_embeddings().num_embeddings)
    token_flops = flops_per_token(model, args.block_size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay),
                                      config=ds_config, lr_scheduler=schedule)
    del model
    if clip is not None and world_size == 1:
        # Nothing to all-reduce, yet DeepSpeed's ZeRO-0 path would still copy every gradient into a flat
        # bucket, "reduce" it and copy it back, every step.
        engine.enable_backward_allreduce = False
    n_sources = len(train_blocks.sources) if train_blocks is not None else 0
    state = {"step": 0, "epoch": 0, "sample": 0, "tokens_seen": 0, "train_loss_sum": 0.0,
             "train_loss_count": 0, "window": [0.0, 0, 0],
             # per training source: [NLL, targets, tokens, blocks] since the last log line; [tokens, blocks] in all
             "source_window": [[0.0] * 4 for _ in range(n_sources)], "source_trained": [[0, 0] for _ in range(n_sources)]}
    if resume:
        _, client_state = engine.load_checkpoint(str(resume_dir), tag=resume_tag)
        if universal:  # a one-off bridge between rank counts; the run's own checkpoints are ordinary ones
            torch.distributed.barrier()  # every rank has read it
            rank0_then_others(lambda: shutil.rmtree(resume_dir / resume_tag), rank=rank,
                              what="remove the converted checkpoint")
        state.update({k: client_state[k] for k in state if k in client_state})
        set_rng_state(client_state["rng"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        # A resumed run rewrites history from its checkpoint on, so the file never holds two futures.
        kept = [m for m in _read_metrics(metrics_path) if m["step"] <= state["step"]] if resume else []
        outputs.write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    board = outputs.open_tensorboard(args, out) if rank == 0 else None
    seen, stats = np.zeros(0, dtype=np.int32), {}
    if args.do_train:
        try:
            seen, stats = _train(engine, args, train_blocks, eval_sets, masker, state, total_steps=total_steps,
                                 rank=rank, world_size=world_size, device_type=device_type, metrics_path=metrics_path,
                                 ckpt_dir=ckpt_dir, flops_per_token=token_flops, layout=layout, settings=settings,
                                 clip=clip, start_time=start_time, intervals=intervals, board=board)
        except Diverged as error:
            latest = ckpt_dir / "latest"
            kept = (f"{latest} still names {latest.read_text().strip()}, the last checkpoint before it"
                    if latest.is_file() else "no checkpoint was saved before it")
            message = (f"{error}. Nothing from that step on was saved ({kept}; no model written). Lower "
                       "--learning_rate (or raise --warmup_steps) and start a new run")
            if world_size == 1:
                raise Diverged(message) from None
            if rank == 0:
                print(f"fastlm train: error: {message}", file=sys.stderr, flush=True)
            _shutdown(world_size, watchdog, status=1)

    eval_start = time.perf_counter()
    final_eval = evaluate_sets(engine, eval_sets, args=args, rank=rank, world_size=world_size, masker=masker)
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
        results = {
            "task": args.task, "steps": state["step"],
            "epochs": state["step"] / steps_per_epoch if steps_per_epoch else 0.0,
            # Token-weighted, as every logged loss: summed token NLL / target tokens over the whole run.
            "train_loss": state["train_loss_sum"] / max(state["train_loss_count"], 1),
            **final_eval, "tokens_seen": state["tokens_seen"],
            "train_blocks": len(train_blocks) if train_blocks is not None else 0,
            "eval_blocks": len(eval_sets[0].blocks) if eval_sets else 0, "world_size": world_size,
            "precision": args.precision, "zero_stage": args.zero_stage, **stats, "ranks": ranks,
            "total_flos": float(token_flops * state["tokens_seen"]), "wall_time_s": time.time() - start_time,
        }
        if n_sources > 1:
            results["train_sources"] = {
                source.name: {"weight": float(weight), "blocks": len(source.blocks), "blocks_trained": blocks,
                              "tokens_trained": tokens}
                for source, weight, (tokens, blocks) in zip(train_blocks.sources, train_blocks.weights,
                                                            state["source_trained"])}
        outputs.write_json(out / "results.json", results)
        _write_hf_outputs(out, args, results, final_eval, eval_sets=eval_sets, intervals=intervals,
                          eval_runtime=eval_runtime, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                          world_size=world_size, metrics_path=metrics_path)
        if board:
            board.close()
        for eval_set in eval_sets:
            result = {key: final_eval.get(f"eval_{eval_set.name}_{key}") for key in ("loss", "perplexity", "tokens", "bits_per_byte")}
            bpb = f"  bits per byte {result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else ""
            print(f"[fastlm] {eval_set.name}: eval loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{bpb} "
                  f"over {result['tokens']} tokens", flush=True)
        print(f"[fastlm] outputs in {out}", flush=True)
    del zero3_context
    _shutdown(world_size, watchdog)
    return results


def _write_hf_outputs(out, args, results, final_eval, *, eval_sets, intervals, eval_runtime, steps_per_epoch,
                      total_steps, world_size, metrics_path):
    """Trainer's result files and trainer_state.json, for users comparing with run_clm.py / run_mlm.py."""
    train = evaluation = None
    if args.do_train:
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
        train = outputs.train_metrics(results, train_samples=results["train_blocks"], global_batch=global_batch)
        metrics = _read_metrics(metrics_path)
        outputs.write_trainer_state(out, outputs.trainer_state(
            metrics, args=args, results=results, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
            intervals=intervals))
        _plot_losses(metrics, out / "loss.png")
    if final_eval:
        n_batches = sum(math.ceil(len(s.blocks) / args.per_device_eval_batch_size) for s in eval_sets)
        evaluation = outputs.eval_metrics(final_eval, epoch=results["epochs"],
                                          eval_samples=sum(len(s.blocks) for s in eval_sets),
                                          runtime=eval_runtime, eval_steps=n_batches)
    outputs.write_hf_results(out, train=train, evaluation=evaluation)


def _train(engine, args, train_blocks, eval_sets, masker, state, *, total_steps, rank, world_size,
           device_type, metrics_path, ckpt_dir, flops_per_token, layout, settings, clip, start_time, intervals,
           board=None):
    """The loop; advances `state` (the resumable position) and returns this run's throughput.

    Every optimizer step's gradient is that of (sum of token losses over all its micro batches and
    ranks) / (target tokens of the whole step), however the step is split (transformers #34191): the
    step's micro batches are fetched first and their targets counted (one all_reduce), and a micro
    batch's loss is its summed token NLL x accumulation x ranks / that count, which undoes DeepSpeed's
    division by the accumulation steps (engine.backward) and its average over ranks (the gradient
    all-reduce, ZeRO 0-3). `clip` is the max gradient norm where the loop clips itself (None: DeepSpeed
    clips and reports the norm). `intervals` (config.Intervals) says when to log, evaluate and save.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    accum, shift = args.gradient_accumulation_steps, args.task == "clm"
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0 or args.disable_tqdm,
               desc=f"{args.task} train", dynamic_ncols=True)
    log = _Logger(engine, state, rank=rank, world_size=world_size, metrics_path=metrics_path, bar=bar,
                  flops_per_token=flops_per_token, device_type=device_type, source_names=train_blocks.names,
                  board=board)
    first_step, data_time, step_time, startup_time, tokens = state["step"], 0.0, 0.0, 0.0, 0
    first_step_s = None  # from the start of the run (set-up, data, model, engine) to the first step done
    # Which sample positions this rank trained on in its first epoch: summed over ranks it shows the shares
    # are disjoint (positions, not blocks: a mixture may draw a block twice in an epoch).
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
        loader = iter(DataLoader(dataset, batch_size=None, num_workers=args.dataloader_num_workers,
                                 pin_memory=device_type == "cuda",
                                 generator=torch.Generator().manual_seed(args.seed + state["epoch"])))
        for first in range(0, len(dataset), accum):
            fetch_start = time.perf_counter()
            batches = [next(loader) for _ in range(accum)]
            t0 = time.perf_counter()
            # The first fetch of an epoch includes starting the workers: a one-off, reported on its own.
            if first == 0:
                startup_time += t0 - fetch_start
            else:
                data_time += t0 - fetch_start
            targets = sum(_targets(batch["labels"], shift=shift) for batch in batches)
            loss_scale = accum * world_size / _sum_targets(targets, device=engine.device, world_size=world_size)
            step_nll, step_tokens, grad_norm = 0.0, 0, None
            for j, batch in enumerate(batches, start=first):
                sources = batch.pop("source", None)  # a mixture's row sources
                step_tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
                labels = batch.pop("labels")  # the model computes no loss of its own: ours is summed
                logits = engine(**model_inputs(batch, config, task=args.task, dtype=dtype)).logits
                rows_nll, rows_targets = row_nll(logits, labels, shift=shift)
                nll = rows_nll.sum()
                if sources is not None:
                    log.add_source_rows(sources.to(engine.device), rows_nll.detach(), rows_targets,
                                        batch["attention_mask"].sum(1))
                engine.backward(nll * loss_scale)
                if clip is not None and j == first + accum - 1:  # gradients reduced over ranks: clip them
                    grad_norm = _clip_gradients(engine.module, clip)
                engine.step()
                step_nll += nll.detach()
                if dataset.epoch == first_epoch:
                    seen[dataset.positions(j)] = 1
            # DeepSpeed skips the update of a step whose gradients are not finite, and reports its norm as inf.
            # With fp16's dynamic loss scaling that is routine (the scale drops); in bf16 or fp32 it is divergence.
            if clip is None and not (args.precision == "fp16" and not engine.was_step_applied()):
                grad_norm = engine.get_global_grad_norm()
            tokens += step_tokens
            state["step"] += 1
            if state["step"] == first_step + 1:
                first_step_s = time.time() - start_time
            epoch_end = first + accum == len(dataset)
            state["epoch"], state["sample"] = ((state["epoch"] + 1, 0) if epoch_end
                                               else (state["epoch"], dataset.end_position(first + accum - 1)))
            log.step_done(step_nll, targets=targets, tokens=step_tokens, grad_norm=grad_norm)
            if intervals.log(state["step"], epoch_end):
                log.write_window()
            for name, source_epoch in dataset.new_source_epochs(first + accum - 1) if rank == 0 else ():
                print(f"[fastlm] step {state['step']}: training source {name} ran out of blocks and starts its "
                      f"epoch {source_epoch} (reshuffled; the other sources go on)", flush=True)
            if eval_sets and intervals.evaluate(state["step"], epoch_end):
                log.write(evaluate_sets(engine, eval_sets, args=args, rank=rank, world_size=world_size, masker=masker))
            if intervals.save(state["step"], epoch_end):
                log.flush()  # checks the steps since the last log line: no checkpoint of a diverged model
                save_checkpoint(engine, ckpt_dir, f"step{state['step']}", state, layout=layout,
                                 settings=settings, rank=rank)
                if rank == 0 and args.save_total_limit:
                    outputs.prune_checkpoints(ckpt_dir, args.save_total_limit)
            step_time += time.perf_counter() - t0
            if state["step"] >= total_steps:
                break
    bar.close()
    steps = state["step"] - first_step
    loop_time = data_time + step_time + startup_time
    return seen, {"data_time_fraction": data_time / (data_time + step_time) if steps else 0.0,
                  "dataloader_startup_s": startup_time, "time_to_first_step_s": first_step_s,
                  "train_runtime_s": loop_time,
                  "train_steps_per_s": steps / loop_time if steps else 0.0,
                  "train_tokens_per_s_per_rank": tokens / loop_time if steps else 0.0}


def _targets(labels, *, shift):
    """Target tokens of a micro batch (labels on the host): CLM's first label of a row is never one."""
    return int((labels[:, 1:] if shift else labels).ne(-100).sum())


def _sum_targets(targets, *, device, world_size):
    """The step's target tokens over all ranks (at least 1: a step without targets has a zero gradient),
    as a tensor left on the device: dividing the loss by it needs no host sync."""
    if world_size == 1:
        return max(targets, 1)
    import torch
    import torch.distributed as dist

    total = torch.tensor(float(targets), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.clamp_(min=1)


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


def _clipping_in_the_loop(ds_config, args):
    """The max gradient norm the loop clips to itself (0: none), taken out of ds_config; None where
    DeepSpeed clips. DeepSpeed's ZeRO-0 fp32 path clips with torch and throws the norm away, which the
    divergence check and the log need: there the loop clips instead, by the same rule."""
    autocast = (ds_config.get("torch_autocast") or {}).get("enabled")
    if args.zero_stage != 0 or args.precision != "fp32" or autocast:
        return None
    clip, ds_config["gradient_clipping"] = ds_config.get("gradient_clipping", 0.0), 0.0
    return clip


def _clip_gradients(module, clip):
    """The gradients' total 2-norm (a tensor: no host sync), after clipping them to `clip` (0: no clipping)."""
    import torch

    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


class Diverged(RuntimeError):
    """The training loss or gradient norm stopped being finite; nothing from that step on was saved."""


class _Logger:
    """The loop's bookkeeping. Each step's summed token NLL stays on the device until a log line, a
    checkpoint or the end needs it, so the loop makes no host sync of its own per step; then one
    all_reduce sums the pending steps over ranks, a step whose loss or gradient norm is not finite stops
    the run (Diverged, on every rank alike: the sums and norms are global), and the sums move into
    state["window"]. At each step config.Intervals.log names, rank 0 appends the window's token-weighted
    loss (summed NLL / target tokens) to metrics.jsonl. The window holds global sums, so a checkpoint between two
    log lines resumes it on any rank count."""

    def __init__(self, engine, state, *, rank, world_size, metrics_path, bar, flops_per_token, device_type,
                 source_names=("train",), board=None):
        import torch

        self.engine, self.state, self.rank, self.world_size = engine, state, rank, world_size
        self.board = board  # outputs.TensorBoard on rank 0 with --report_to tensorboard
        self.metrics_path, self.bar, self.flops_per_token = metrics_path, bar, flops_per_token
        self.pending = []  # (step, summed NLL on the device, targets, tokens, grad norm) since the last flush
        self.peak = None
        if device_type == "cuda":
            name = torch.cuda.get_device_name()
            self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.since = time.perf_counter()
        self.grad_norm = None
        self.source_names = list(source_names)
        # A mixture's [NLL, targets, tokens, blocks] of each source since the last flush, on this rank's device
        self.source_pending = torch.zeros((len(self.source_names), 4), dtype=torch.float64, device=engine.device)

    def add_source_rows(self, sources, nll, targets, tokens):
        """A mixture micro batch: each row's source, summed NLL, targets and tokens (device tensors)."""
        import torch

        rows = torch.stack([nll, targets.double(), tokens.double(), torch.ones_like(nll)], dim=1)
        self.source_pending.index_add_(0, sources, rows)

    def step_done(self, nll, *, targets, tokens, grad_norm):
        self.pending.append((self.state["step"], nll, targets, tokens, grad_norm))
        if self.rank == 0:
            self.bar.update(1)

    def flush(self):
        """Sum the pending steps over ranks, check them, and add them to state["window"]."""
        import torch

        if not self.pending:
            return
        steps, nll, targets, tokens, norms = zip(*self.pending)
        self.pending = []
        device = self.engine.device
        totals = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in nll]),
                              torch.tensor(targets, dtype=torch.float64, device=device),
                              torch.tensor(tokens, dtype=torch.float64, device=device)])
        if self.world_size > 1:
            torch.distributed.all_reduce(totals)
        nll, targets, tokens = totals.tolist()
        norms = [None if norm is None else float(norm) for norm in norms]
        for step, step_nll, step_targets, norm in zip(steps, nll, targets, norms):
            if not (math.isfinite(step_nll) and (norm is None or math.isfinite(norm))):
                loss = step_nll / step_targets if step_targets else step_nll
                raise Diverged(f"training diverged at step {step}: loss {loss}, gradient norm {norm}")
        window = self.state["window"]
        window[0], window[1], window[2] = window[0] + sum(nll), window[1] + int(sum(targets)), window[2] + int(sum(tokens))
        self.grad_norm = norms[-1]
        if len(self.source_names) > 1:  # global sums too, so a checkpoint resumes them on any rank count
            if self.world_size > 1:
                torch.distributed.all_reduce(self.source_pending)
            for window, sums in zip(self.state["source_window"], self.source_pending.tolist()):
                window[:] = [a + b for a, b in zip(window, sums)]
            self.source_pending.zero_()

    def write_window(self):
        self.flush()
        nll_sum, targets, tokens = self.state["window"]
        seconds = time.perf_counter() - self.since
        self.state["tokens_seen"] += tokens
        self.state["train_loss_sum"] += nll_sum
        self.state["train_loss_count"] += targets
        record = {"epoch": self.state["epoch"], "loss": nll_sum / targets if targets else None,
                  "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / seconds, "tokens_seen": self.state["tokens_seen"]}
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens / seconds / (self.peak * self.world_size)
        if len(self.source_names) > 1:
            for name, (source_nll, source_targets, n_tokens, blocks), trained in zip(
                    self.source_names, self.state["source_window"], self.state["source_trained"]):
                record[f"train_{name}_loss"] = source_nll / source_targets if source_targets else math.nan
                record[f"train_{name}_tokens"] = int(n_tokens)
                trained[0] += int(n_tokens)
                trained[1] += int(blocks)
            self.state["source_window"] = [[0.0] * 4 for _ in self.source_names]
        self.write(record)
        if self.rank == 0 and targets:
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


def _shutdown(world_size, watchdog, status=0):
    """With several ranks, torch's gloo can abort at interpreter exit after a clean run (SIGABRT in
    1-4 of 10 runs): leave the process group in order and exit without running the interpreter's
    teardown. The watchdog stops first: a rank that has finished must not be reported as stopped."""
    if watchdog:
        watchdog.stop()
    if world_size == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --- the offline demo ---------------------------------------------------------------------------------

DEMO_DIR = Path("runs/demo")  # relative: the demo writes under the directory it is started from
DEMO_STEPS = 300


def demo_argv(output_dir=DEMO_DIR, max_steps=None):
    """Arguments of the offline demo, after writing its corpus: every pydoc topic as one document (a
    line: the topics' own newlines become spaces) from the stdlib, so every machine has it.

    max_steps defaults to $FASTLM_DEMO_STEPS, else DEMO_STEPS: tests run the demo's launch forms for a
    few steps through the environment, the one input a launcher passes on unchanged.
    """
    from pydoc_data.topics import topics

    output_dir = Path(output_dir)
    corpus = output_dir / "pydoc_topics.txt"
    if not corpus.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = corpus.with_name(f"{corpus.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(" ".join(text.split()) + "\n" for _, text in sorted(topics.items())), encoding="utf-8")
        # Every rank of a launch gets here before any process group exists. A hard link never replaces:
        # the first rank's file stays, so all ranks see one file (its mtime is part of the key of the
        # prepared-data cache, which a second rename would change under rank 0's feet).
        with contextlib.suppress(FileExistsError):
            os.link(tmp, corpus)
        tmp.unlink()
    max_steps = max_steps or os.environ.get("FASTLM_DEMO_STEPS", DEMO_STEPS)
    return ["--task", "clm", "--train_file", str(corpus), "--train_tokenizer", "--vocab_size", "4096",
            "--config_name", "gpt2-mini", "--block_size", "128", "--separator", "eos",
            "--validation_split_percentage", "10", "--per_device_train_batch_size", "16",
            "--learning_rate", "2e-3", "--weight_decay", "0.01", "--warmup_steps", "30",
            "--lr_scheduler_type", "cosine", "--max_steps", str(max_steps), "--logging_steps", "10",
            "--eval_steps", "100",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir)]


if __name__ == "__main__":
    sys.exit(main())