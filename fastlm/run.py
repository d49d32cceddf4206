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

import json
import math
import os
import random
import shutil
import socket
import time

import numpy as np

from fastlm.config import (LENGTH_FLAGS, RESULT_FLAGS, ConfigError, build_ds_config, check_args, lr_schedule, parse,
                           resume_settings)
from fastlm.data import (TrainBatches, check_token_ids, check_tokenizers, describe_sources, make_masker, open_or_prepare,
                         plan, rank0_then_others)
from fastlm.evaluation import evaluate_sets, nll_by_source
from fastlm.model import build_model, flops_per_token, model_inputs, param_groups, position_offset

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


# --- outputs ------------------------------------------------------------------------------------------

def _write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    args, explicit, parser = parse(argv)
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
    stores = open_or_prepare(args, rank)
    check_tokenizers(stores)
    tokenizer = AutoTokenizer.from_pretrained(stores.tokenizer_dir)
    train_blocks, eval_sets = plan(args, stores, tokenizer)  # a Mixture of the training sources
    masker = make_masker(args, tokenizer) if args.task == "mlm" else None

    per_rank = len(train_blocks) // (args.per_device_train_batch_size * world_size)
    steps_per_epoch = per_rank // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(train_blocks)} blocks of {args.block_size} tokens: fewer than one "
            f"optimizer step ({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x "
            f"{world_size} ranks); use a smaller batch or block size or more data")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs

    ckpt_dir = out / "checkpoints"
    layout = _data_layout(args, world_size=world_size, train_blocks=train_blocks)
    settings = resume_settings(args)
    resume_tag, universal = None, False
    if args.resume:  # checked before the model is built: another model shape would fail inside DeepSpeed
        resume_tag = (ckpt_dir / "latest").read_text().strip()
        _check_resumable(_read_json(ckpt_dir / resume_tag / CHECKPOINT_SETTINGS), settings, layout, rank=rank)
        resume_tag, universal = _universal_if_resharded(ckpt_dir, resume_tag, world_size=world_size, rank=rank)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    model, zero3_context = build_model(args, tokenizer, ds_config)
    check_token_ids(stores, model.get_input_embeddings().num_embeddings)
    token_flops = flops_per_token(model, args.block_size)
    schedule = None
    if "scheduler" not in ds_config:
        factor = lr_schedule(args, total_steps)
        schedule = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # noqa: E731
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, args.weight_decay),
                                      config=ds_config, lr_scheduler=schedule)
    del model
    n_sources = len(train_blocks.sources)
    state = {"step": 0, "epoch": 0, "sample": 0, "tokens_seen": 0, "train_loss_sum": 0.0,
             "train_loss_count": 0, "window": [0.0, 0, 0],
             # per training source: [NLL, targets, tokens, blocks] since the last log line; [tokens, blocks] in all
             "source_window": [[0.0] * 4 for _ in range(n_sources)], "source_trained": [[0, 0] for _ in range(n_sources)]}
    if args.resume:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=resume_tag)
        if universal:  # a one-off bridge between rank counts; the run's own checkpoints are ordinary ones
            torch.distributed.barrier()  # every rank has read it
            rank0_then_others(lambda: shutil.rmtree(ckpt_dir / resume_tag), rank=rank, what="remove the converted checkpoint")
        state.update({k: client_state[k] for k in state if k in client_state})
        _set_rng_state(client_state["rng"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        # A resumed run rewrites history from its checkpoint on, so the file never holds two futures.
        kept = [m for m in _read_metrics(metrics_path) if m["step"] <= state["step"]] if args.resume else []
        tmp = Path(f"{metrics_path}.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, metrics_path)

    seen, stats = _train(engine, args, train_blocks, eval_sets, masker, state, total_steps=total_steps,
                         rank=rank, world_size=world_size, device_type=device_type, metrics_path=metrics_path,
                         ckpt_dir=ckpt_dir, flops_per_token=token_flops, layout=layout, settings=settings)

    final_eval = evaluate_sets(engine, eval_sets, args=args, rank=rank, world_size=world_size, masker=masker)
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
            "eval_blocks": len(eval_sets[0].blocks) if eval_sets else 0, "world_size": world_size,
            "precision": args.precision, "zero_stage": args.zero_stage, **stats, "ranks": ranks,
            "wall_time_s": time.time() - start_time,
        }
        if n_sources > 1:
            results["train_sources"] = {
                source.name: {"weight": float(weight), "blocks": len(source.blocks), "blocks_trained": blocks,
                              "tokens_trained": tokens}
                for source, weight, (tokens, blocks) in zip(train_blocks.sources, train_blocks.weights,
                                                            state["source_trained"])}
        _write_json(out / "results.json", results)
        _plot_losses(_read_metrics(metrics_path), out / "loss.png")
        for eval_set in eval_sets:
            result = {key: final_eval.get(f"eval_{eval_set.name}_{key}") for key in ("loss", "perplexity", "tokens", "bits_per_byte")}
            bpb = f"  bits per byte {result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else ""
            print(f"[fastlm] {eval_set.name}: eval loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{bpb} "
                  f"over {result['tokens']} tokens", flush=True)
        print(f"[fastlm] outputs in {out}", flush=True)
    del zero3_context
    _shutdown(world_size)
    return results


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
        _write_json(ckpt_dir / tag / CHECKPOINT_SETTINGS, {"layout": layout, "settings": settings})
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "rng": _rng_state()})


def _data_layout(args, *, world_size, train_blocks):
    """What a checkpoint's data position (epoch, sample position) counts in: the blocks (by content and
    number, and each mixture source's weight) and how each optimizer step splits its global batch."""
    return {**train_blocks.identity(),
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
        was, now = saved_layout.get("sources", []), layout["sources"]
        if len(was) > 1 or len(now) > 1:
            raise ConfigError(f"--resume: the checkpoint was trained on the mixture {describe_sources(was)}; now "
                              f"{describe_sources(now)}. Its data position counts samples of that mixture: resume "
                              "with the same sources and weights, or start a new run")
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


def _train(engine, args, train_blocks, eval_sets, masker, state, *, total_steps, rank, world_size,
           device_type, metrics_path, ckpt_dir, flops_per_token, layout, settings):
    """The loop; advances `state` (the resumable position) and returns this run's throughput."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm


    accum = args.gradient_accumulation_steps
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0 or args.disable_tqdm,
               desc=f"{args.task} train", dynamic_ncols=True)
    log = _Logger(engine, args, state, rank=rank, world_size=world_size, metrics_path=metrics_path, bar=bar,
                  flops_per_token=flops_per_token, device_type=device_type, source_names=train_blocks.names)
    first_step, data_time, step_time, startup_time, tokens = state["step"], 0.0, 0.0, 0.0, 0
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
            sources = batch.pop("source", None)  # a mixture's row sources
            n_tokens = int(batch["attention_mask"].sum())
            if sources is not None:
                log.add_source_rows(sources, batch["attention_mask"].sum(1))
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            output = engine(**model_inputs(batch, config, task=args.task, dtype=dtype))
            loss = output.loss
            if sources is not None:
                log.add_source_nll(*nll_by_source(output.logits.detach(), batch["labels"], sources.to(engine.device),
                                                  len(train_blocks.sources), shift=args.task == "clm"))
            del output
            engine.backward(loss)
            if (j + 1) % accum == 0 and log.due(state["step"] + 1, total_steps) and _unscaled_plain_grads(engine):
                log.grad_norm = _grad_norm(engine.module)  # DeepSpeed reports none on this path
            engine.step()
            log.add(loss.detach(), n_tokens)
            tokens += n_tokens
            if dataset.epoch == first_epoch:
                seen[dataset.positions(j)] = 1
            j += 1
            if j % accum == 0:
                state["step"] += 1
                state["epoch"], state["sample"] = ((state["epoch"] + 1, 0) if j == len(dataset)
                                                   else (state["epoch"], dataset.end_position(j - 1)))
                log.step_done(total_steps)
                for name, source_epoch in dataset.new_source_epochs(j - 1) if rank == 0 else ():
                    print(f"[fastlm] step {state['step']}: training source {name} ran out of blocks and starts its "
                          f"epoch {source_epoch} (reshuffled; the other sources go on)", flush=True)
                if eval_sets and args.eval_steps and state["step"] % args.eval_steps == 0 \
                        and state["step"] != total_steps:
                    log.write(evaluate_sets(engine, eval_sets, args=args, rank=rank, world_size=world_size, masker=masker))
                if args.save_steps and state["step"] % args.save_steps == 0:
                    _save_checkpoint(engine, ckpt_dir, f"step{state['step']}", state, layout=layout,
                                     settings=settings, rank=rank)
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
    `state`, so a checkpoint between two log lines resumes them too. A mixture's lines also give each
    source's token-weighted loss and tokens (train_<name>_loss, train_<name>_tokens)."""

    def __init__(self, engine, args, state, *, rank, world_size, metrics_path, bar, flops_per_token, device_type,
                 source_names=("train",)):
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
        self.source_names = list(source_names)
        # [NLL, targets] of each source, on device like the loss
        self.source_nll = torch.zeros((len(self.source_names), 2), dtype=torch.float64, device=engine.device)

    def due(self, step, total_steps):
        return step % self.args.logging_steps == 0 or step == total_steps

    def add(self, loss, n_tokens):
        self.loss += loss.double()
        self.state["window"][1] += 1
        self.state["window"][2] += n_tokens

    def add_source_rows(self, sources, row_tokens):
        """A mixture micro batch: each row's source and tokens (CPU tensors)."""
        for source, n_tokens in zip(sources.tolist(), row_tokens.tolist()):
            self.state["source_window"][source][2] += n_tokens
            self.state["source_window"][source][3] += 1

    def add_source_nll(self, nll, targets):
        self.source_nll[:, 0] += nll
        self.source_nll[:, 1] += targets

    def step_done(self, total_steps):
        import torch

        step = self.state["step"]
        if self.rank == 0:
            self.bar.update(1)
        # One host sync per optimizer step (not per micro batch), so a checkpoint holds the window exactly.
        self.state["window"][0] += self.loss.item()
        self.loss.zero_()
        mixture = len(self.source_names) > 1
        if mixture:
            for window, (nll, targets) in zip(self.state["source_window"], self.source_nll.tolist()):
                window[0] += nll
                window[1] += targets
            self.source_nll.zero_()
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
        if mixture:
            sums = _sum_over_ranks(self.state["source_window"], dtype=torch.float64, device=self.engine.device,
                                   world_size=self.world_size).tolist()
            for name, (nll, targets, n_tokens, blocks), trained in zip(self.source_names, sums,
                                                                       self.state["source_trained"]):
                record[f"train_{name}_loss"] = nll / targets if targets else math.nan
                record[f"train_{name}_tokens"] = int(n_tokens)
                trained[0] += int(n_tokens)
                trained[1] += int(blocks)
            self.state["source_window"] = [[0.0] * 4 for _ in self.source_names]
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