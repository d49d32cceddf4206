"""A run from its command line to its outputs: configuration, process group, data, model, engine, resume,
the loop, the final evaluation and what is left in --output_dir.

Rank 0 logs and writes <output_dir>/metrics.jsonl, results.json, loss.png, the final model and tokenizer
(at output_dir itself, loadable with from_pretrained, as run_clm.py leaves them), HF's
all/train/eval_results.json and trainer_state.json, and checkpoints in Trainer's layout (checkpoint-N/, with
DeepSpeed's state carrying the data position and RNG state so --resume continues exactly). A configuration
error is one line and exit status 2 before anything starts; a diverged run, or one that cannot write a
checkpoint, exits with status 1, naming the step.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import deepspeed
import numpy as np
import torch
from deepspeed.utils import logger as ds_logger
from tqdm.auto import tqdm

from fastlm.train import checkpoints, config as run_config, data as data_plan, demo, deepspeed_config, dist, outputs
from fastlm.train import muon
from fastlm.train.errors import CheckpointFailed, ConfigError, Diverged, fail, is_rank0, warn
from fastlm.train.evaluation import evaluate_sets
from fastlm.train.heads import LMLoss
from fastlm.train.loop import Trainer, TrainState, clipping_in_the_loop
from fastlm.train.metrics import StepLog
from fastlm.train.model import (build_model, default_block_size, flops_per_token, param_groups, save_model,
                                trainer_flops_per_token, write_model)
from fastlm.train.safe_load import install_safe_checkpoint_engine, scan_checkpoint, set_rng_state, weights_only_loads
from fastlm.train.schedule import Intervals, check_lr_schedule, lr_schedule
from fastlm.train.stores import check_token_ids, check_tokenizers, open_or_prepare
from fastlm.train.trackers import TrackerError, open_trackers
from fastlm.train.watchdog import RankWatchdog


def main(argv=None):
    """The command line (`python -m fastlm.run`, `fastlm train`): train, then return exit status 0.
    Bad configurations exit with status 2 and one message; a diverged run, or a checkpoint that cannot be
    written, with status 1."""
    try:
        train(argv)
    except (Diverged, CheckpointFailed) as error:
        print(f"fastlm train: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def train(argv=None):
    """Train from command-line arguments (sys.argv[1:] by default; none at all, or only the `--local_rank` a
    launcher adds, = the offline demo). Returns results.json's content on rank 0 (None on other ranks);
    raises Diverged when the loss or gradient norm stops being finite."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if demo.only_launcher_arguments(argv):
        argv += demo.demo_argv()
        if is_rank0():
            print("[fastlm] no arguments: the offline demo. Training a tiny GPT on the stdlib's pydoc topics "
                  f"(about 2 minutes on 2 CPU cores; outputs in {demo.DEMO_DIR.resolve()}). `--help` lists the "
                  "runner's flags.", flush=True)
    start_time = time.time()  # of wall_time_s and time_to_first_step_s
    config = run_config.parse(argv, device_type=dist.device_type())
    try:
        with contextlib.ExitStack() as held:  # what the run holds until it ends (its data cache entry)
            return Run(config, start_time, held).go()
    except ConfigError as error:
        fail(error, 2)


@dataclass
class Plan:
    """The run's data: its stores' tokenizer, the training Mixture (None when it only evaluates), the
    evaluation sets, the MLM masker (None for CLM), and the optimizer steps it takes."""
    stores: object
    tokenizer: object
    train_blocks: object
    eval_sets: list
    masker: object
    steps_per_epoch: int = 0
    total_steps: int = 0


class Run:
    def __init__(self, config, start_time, held):
        self.config, self.start_time, self.held = config, start_time, held
        self.rank, self.world_size, self.local_rank = dist.environment()
        self.device_type = dist.device_type()
        self.out = config.checkpoint.output_dir
        self.metrics_path = self.out / "metrics.jsonl"

    def go(self):
        config, rank, world_size = self.config, self.rank, self.world_size
        # Config errors that need the rank count come before anything starts (no process group, data or model).
        ds_config = deepspeed_config.build(config.optim, world_size=world_size, device_type=self.device_type)
        clip = clipping_in_the_loop(ds_config, config.optim)
        ds_logger.setLevel("WARNING")
        dist.init(config.runtime, device=self.device_type, local_rank=self.local_rank)
        self.watchdog = RankWatchdog.start(config.runtime.ddp_timeout, rank=rank, world_size=world_size)
        random.seed(config.runtime.seed)
        np.random.seed(config.runtime.seed)
        torch.manual_seed(config.runtime.seed)
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if config.checkpoint.overwrite_output_dir and config.do_train:
                outputs.clear_checkpoints(outputs.list_checkpoints(self.out))
        plan = self.plan()
        config = self.config  # with the block size plan() resolved
        intervals = Intervals.of(config, plan.total_steps)
        layout = (checkpoints.data_layout(config.optim, world_size=world_size, train_blocks=plan.train_blocks)
                  if config.do_train else None)
        resume = self.resume_point(layout) if config.checkpoint.resume and config.do_train else None
        if resume and resume[2]:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        engine, keep_alive, token_flops = self.engine(plan, ds_config, clip)
        self.trainer_token_flops = trainer_flops_per_token(engine.module)
        state = TrainState.start(len(plan.train_blocks.sources) if plan.train_blocks is not None else 0)
        if resume:
            state = self.load(engine, resume, state)
        self.start_metrics(resumed=resume is not None, step=state.step)
        # Every exit path ends the trackers' runs (`with`); a divergence ends them as failed first.
        with self.open_trackers(engine, plan) as self.trackers:
            log = StepLog(state, device=engine.device, rank=rank, world_size=world_size, metrics_path=self.metrics_path,
                          bar=None, flops_per_token=token_flops, trackers=self.trackers,
                          source_names=plan.train_blocks.names if plan.train_blocks is not None else ("train",))
            trained = self.train(engine, plan, state, log, clip=clip, intervals=intervals, layout=layout) \
                if config.do_train else None
            results = self.finish(engine, plan, state, log, trained, token_flops=token_flops, intervals=intervals)
        del keep_alive
        dist.shutdown(world_size, self.watchdog)
        return results

    def plan(self):
        """Stores (prepared from text first when needed), their tokenizer, blocks, evaluation sets, masker, length."""
        config = self.config
        stores = open_or_prepare(config.data, self.rank, self.held)
        check_tokenizers(stores)
        tokenizer = stores.load_tokenizer(config.data.tokenizer)
        if config.data.block_size is None:
            config = self.config = self.resolve_block_size(tokenizer)
        train_blocks, eval_sets = data_plan.plan(config.data, stores, tokenizer, do_train=config.do_train,
                                                 do_eval=config.do_eval)
        masker = data_plan.make_masker(config.data, tokenizer) if config.task == "mlm" else None
        plan = Plan(stores, tokenizer, train_blocks, eval_sets, masker)
        if config.do_train:
            optim = config.optim
            per_rank = len(train_blocks) // (optim.per_device_train_batch_size * self.world_size)
            plan.steps_per_epoch = per_rank // optim.gradient_accumulation_steps
            if plan.steps_per_epoch == 0:
                raise ConfigError(
                    f"the training set has {len(train_blocks)} blocks of {config.data.block_size} tokens: fewer than "
                    f"one optimizer step ({optim.per_device_train_batch_size} x {optim.gradient_accumulation_steps} x "
                    f"{self.world_size} ranks); use a smaller batch or block size or more data")
            plan.total_steps = optim.max_steps or math.ceil(plan.steps_per_epoch * optim.num_train_epochs)
        return plan

    def resolve_block_size(self, tokenizer):
        """The configuration with the block size run_clm.py / run_mlm.py take when none is given (said once)."""
        block_size, why = default_block_size(self.config.model, tokenizer)
        if self.rank == 0:
            print(f"[fastlm] block size {block_size}: {why}; --block_size sets another", flush=True)
        return dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, block_size=block_size))

    def resume_point(self, layout):
        """(checkpoint-N directory, DeepSpeed tag in it, universal): checked before the model is built, since
        another model shape would fail inside DeepSpeed; converted to DeepSpeed's universal format when the
        rank count changed."""
        rank = self.rank
        resume_dir = self.config.checkpoint.resume_point()
        tag, saved = checkpoints.checkpoint_to_resume(resume_dir)
        found = outputs.list_checkpoints(self.out)
        later = [p.name for p in found[found.index(resume_dir) + 1:]] if resume_dir in found else []
        if later:
            warn(f"{', '.join(later)} in {self.out} come after {resume_dir.name}: this run replaces them as it reaches "
                 "their steps; until then a --resume picks the newest of them")
        dist.rank0_then_others(lambda: checkpoints.verify_checkpoint(resume_dir, saved.get("files")), rank=rank,
                               what="verify the checkpoint")
        checkpoints.check_resumable(saved, checkpoints.resume_settings(self.config), layout, rank=rank)
        dist.rank0_then_others(lambda: scan_checkpoint(resume_dir), rank=rank,
                               what="check the checkpoint for pickled code")
        with weights_only_loads():  # ds_to_universal calls torch.load(weights_only=False) itself
            tag, universal = checkpoints.universal_if_resharded(resume_dir, tag, world_size=self.world_size, rank=rank)
        return resume_dir, tag, universal

    def engine(self, plan, ds_config, clip):
        """(the DeepSpeed engine, what must stay alive while it trains, the model's FLOPs per token)."""
        config = self.config
        schedule = None
        if "scheduler" not in ds_config:
            check_lr_schedule(config.optim, max(plan.total_steps, 1))
            schedule = lr_schedule(config.optim, max(plan.total_steps, 1))
        model, keep_alive = build_model(config.model, plan.tokenizer, block_size=config.data.block_size,
                                        ds_config=ds_config)
        check_token_ids(plan.stores, model.get_input_embeddings().num_embeddings)
        # The engine trains the model with its loss: the fused CLM loss or the sparse MLM head (heads.LMLoss).
        loss = LMLoss(model, config.task, zero_stage=config.optim.zero_stage)
        token_flops = flops_per_token(model, config.data.block_size, sparse_head=loss.sparse_head,
                                      predicted=config.data.mlm_probability)
        if self.rank == 0:
            print(f"[fastlm] {loss.summary}", flush=True)
        engine, *_ = deepspeed.initialize(model=loss, config=ds_config, lr_scheduler=schedule, **self.optimizer(model))
        install_safe_checkpoint_engine(engine)  # loads weights-only: nothing a checkpoint holds runs
        if clip is not None and self.world_size == 1:
            # Nothing to all-reduce, yet DeepSpeed's ZeRO-0 path would still copy every gradient into a flat
            # bucket, "reduce" it and copy it back, every step.
            engine.enable_backward_allreduce = False
        return engine, keep_alive, token_flops

    def optimizer(self, model):
        """deepspeed.initialize's optimizer argument: AdamW's parameter groups (DeepSpeed builds AdamW from the
        config's "optimizer" entry), or, for --optim muon, the optimizer itself (fastlm.train.muon)."""
        optim = self.config.optim
        if optim.optim != "muon":
            return {"model_parameters": param_groups(model, optim.weight_decay)}
        groups, summary = muon.param_groups(model, optim)
        if self.rank == 0:
            print(f"[fastlm] {summary}", flush=True)
        return {"optimizer": muon.optimizer(groups, device_type=self.device_type)}

    def load(self, engine, resume, state):
        """Load a checkpoint into the engine; the state it saved (data position, sums) and its RNG state."""
        resume_dir, tag, universal = resume
        with weights_only_loads():
            _, client_state = engine.load_checkpoint(str(resume_dir), tag=tag)
        if universal:  # a one-off bridge between rank counts; the run's own checkpoints are ordinary ones
            dist.barrier()  # every rank has read it
            dist.rank0_then_others(lambda: shutil.rmtree(resume_dir / tag), rank=self.rank,
                                   what="remove the converted checkpoint")
        state = state.resumed(client_state)
        set_rng_state(client_state["rng"])
        if self.rank == 0:
            print(f"[fastlm] resumed from {resume_dir}: step {state.step}, epoch {state.epoch}, sample "
                  f"{state.sample}", flush=True)
        return state

    def open_trackers(self, engine, plan):
        """The --report_to trackers, started on rank 0 (every rank stops together when one cannot start)."""
        opened = [open_trackers([], output_dir=self.out)]

        def start():
            logging = self.config.logging
            try:
                opened[0] = open_trackers(
                    logging.report_to, output_dir=self.out, run_name=logging.run_name, project=logging.project,
                    config=run_config.as_flags(self.config), model_config=engine.module.config.to_dict(),
                    logging_dir=logging.logging_dir, steps_per_epoch=plan.steps_per_epoch or None)
            except TrackerError as error:
                raise ConfigError(str(error)) from None

        if self.config.logging.report_to:
            dist.rank0_then_others(start if self.rank == 0 else lambda: None, rank=self.rank,
                                   what="start the --report_to trackers")
        return opened[0]

    def start_metrics(self, *, resumed, step):
        if self.rank == 0:
            # A resumed run rewrites history from its checkpoint on, so the file never holds two futures.
            kept = [m for m in outputs.read_metrics(self.metrics_path) if m["step"] <= step] if resumed else []
            outputs.write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def train(self, engine, plan, state, log, *, clip, intervals, layout):
        """The loop (loop.Trainer) with its log, evaluation and checkpoint calls; (this rank's first-epoch sample
        positions, the loop's times). A divergence stops every rank, naming the step."""
        config, rank = self.config, self.rank
        log.bar = tqdm(total=plan.total_steps, initial=state.step, disable=rank != 0 or config.logging.disable_tqdm,
                       desc=f"{config.task} train", dynamic_ncols=True)
        settings = checkpoints.resume_settings(config)

        def after_step(epoch_end, new_source_epochs):
            if intervals.log(state.step, epoch_end):
                log.write_window()
            for name, source_epoch in new_source_epochs:
                print(f"[fastlm] step {state.step}: training source {name} ran out of blocks and starts its "
                      f"epoch {source_epoch} (reshuffled; the other sources go on)", flush=True)
            if plan.eval_sets and intervals.evaluate(state.step, epoch_end):
                log.write(self.evaluate(engine, plan))
            if intervals.save(state.step, epoch_end):
                log.flush()  # checks the steps since the last log line: no checkpoint of a diverged model
                checkpoints.save_checkpoint(engine, self.out, state.step, vars(state), layout=layout, settings=settings,
                                            rank=rank, write_hf_files=lambda directory: self.write_hf_checkpoint(
                                                engine, plan, state, intervals, directory))
                if rank == 0 and config.checkpoint.save_total_limit:
                    outputs.prune_checkpoints(outputs.list_checkpoints(self.out), config.checkpoint.save_total_limit,
                                              saved=outputs.checkpoint_path(self.out, state.step))

        trainer = Trainer(engine, plan.train_blocks, state, task=config.task, optim=config.optim,
                          seed=config.data.seed, num_workers=config.runtime.dataloader_num_workers, masker=plan.masker,
                          rank=rank, world_size=self.world_size, total_steps=plan.total_steps, log=log, clip=clip,
                          after_step=after_step, start_time=self.start_time, compiled=config.model.torch_compile)
        try:
            times = trainer.run()
        except Diverged as error:
            self.trackers.finish("failed")
            self.diverged(error)
        except CheckpointFailed as error:
            self.trackers.finish("failed")
            self.checkpoint_failed(error)
        finally:
            log.bar.close()
        return trainer.first_epoch_positions(), times

    def write_hf_checkpoint(self, engine, plan, state, intervals, directory):
        """What Trainer puts in checkpoint-N beside DeepSpeed's state: the model and tokenizer (from_pretrained
        loads the checkpoint) and trainer_state.json as of that step."""
        write_model(engine, plan.tokenizer, directory, self.rank)
        if self.rank == 0:
            optim = self.config.optim
            outputs.write_trainer_state(directory, outputs.trainer_state(
                outputs.read_metrics(self.metrics_path), micro_batch=optim.per_device_train_batch_size,
                step=state.step, tokens_seen=state.tokens_seen,
                total_flos=float(self.trainer_token_flops * state.tokens_seen), steps_per_epoch=plan.steps_per_epoch,
                total_steps=plan.total_steps, intervals=intervals))

    def save_final_model(self, engine, plan, state):
        """The model and tokenizer at output_dir; a failed write (disk full, file-size limit) is CheckpointFailed,
        naming the file and the errno, with the model that was there before left as it was."""
        try:
            save_model(engine, plan.tokenizer, self.out, self.rank)
        except Exception as error:
            staging = self.out / ".tmp-model"
            failure = checkpoints.write_failure(error, staging)
            if failure is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            newest = outputs.newest_checkpoint(self.out)
            raise CheckpointFailed(f"step {state.step}: cannot save the model in {self.out}: {failure}; the files there "
                                   "are as they were" + (f" and {newest} holds the model of step "
                                                         f"{newest.name.split('-')[1]}" if newest else "")) from None

    def checkpoint_failed(self, error):
        """A checkpoint that cannot be written stops the run: one line from the rank that failed, status 1."""
        if self.world_size == 1:
            raise error
        print(f"fastlm train: error: rank {self.rank}: {error}", file=sys.stderr, flush=True)
        os._exit(1)  # the other ranks wait in the save's collectives: the launcher stops them

    def diverged(self, error):
        newest = outputs.newest_checkpoint(self.out)
        kept = (f"{newest} is still the newest checkpoint, the last before it" if newest
                else "no checkpoint was saved before it")
        message = (f"{error}. Nothing from that step on was saved ({kept}; no model written). Lower "
                   "--learning_rate (or raise --warmup_steps) and start a new run")
        if self.world_size == 1:
            raise Diverged(message) from None
        if self.rank == 0:
            print(f"fastlm train: error: {message}", file=sys.stderr, flush=True)
        dist.shutdown(self.world_size, self.watchdog, status=1)

    def evaluate(self, engine, plan):
        """Every evaluation set, with Trainer's eval_runtime, eval_samples_per_second and eval_steps_per_second."""
        batch_size = self.config.evaluation.per_device_eval_batch_size
        start = time.perf_counter()
        results = evaluate_sets(engine, plan.eval_sets, task=self.config.task, batch_size=batch_size, rank=self.rank,
                                world_size=self.world_size, masker=plan.masker,
                                progress=not self.config.logging.disable_tqdm)
        if plan.eval_sets:
            results.update(outputs.eval_speed(time.perf_counter() - start, plan.eval_sets, batch_size=batch_size))
        return results

    def finish(self, engine, plan, state, log, trained, *, token_flops, intervals):
        """The final evaluation, the model, results.json and HF's result files; results.json's content on rank 0."""
        config, rank = self.config, self.rank
        final_eval = self.evaluate(engine, plan)
        positions, times = trained or (np.zeros(0, dtype=np.int64), None)
        seen = np.zeros(len(plan.train_blocks) if plan.train_blocks is not None else 0, dtype=np.int32)
        seen[positions] = 1
        ranks = dist.rank_report(seen, final_eval.get("eval_loss"), world_size=self.world_size, device=engine.device)
        if config.do_train:
            self.save_final_model(engine, plan, state)
        if rank != 0:
            return None
        if final_eval:
            log.write(final_eval)
        results = _results(config, plan, state, final_eval, ranks=ranks, times=times,
                           token_flops=(token_flops, self.trainer_token_flops), world_size=self.world_size,
                           wall_time_s=time.time() - self.start_time)
        outputs.write_json(self.out / "results.json", results)
        outputs.write_hf_outputs(self.out, config.optim, results, final_eval, eval_sets=plan.eval_sets,
                                 intervals=intervals, steps_per_epoch=plan.steps_per_epoch,
                                 total_steps=plan.total_steps, world_size=self.world_size,
                                 metrics_path=self.metrics_path)
        for eval_set in plan.eval_sets:
            result = {key: final_eval.get(f"eval_{eval_set.name}_{key}")
                      for key in ("loss", "perplexity", "tokens", "bits_per_byte")}
            bpb = f"  bits per byte {result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else ""
            print(f"[fastlm] {eval_set.name}: eval loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}"
                  f"{bpb} over {result['tokens']} tokens", flush=True)
        print(f"[fastlm] outputs in {self.out}", flush=True)
        return results


def _results(config, plan, state, final_eval, *, ranks, times, token_flops, world_size, wall_time_s):
    """results.json: the run's losses (token-weighted, as every logged loss), sizes, throughput and checks.
    token_flops: (fastlm's FLOPs per token, with embeddings and attention; Trainer's, for total_flos)."""
    train_blocks = plan.train_blocks
    results = {
        "task": config.task, "steps": state.step,
        "epochs": state.step / plan.steps_per_epoch if plan.steps_per_epoch else 0.0,
        "train_loss": state.train_loss_sum / max(state.train_loss_count, 1),
        **final_eval, "tokens_seen": state.tokens_seen,
        "train_blocks": len(train_blocks) if train_blocks is not None else 0,
        "eval_blocks": len(plan.eval_sets[0].blocks) if plan.eval_sets else 0, "world_size": world_size,
        "precision": config.optim.precision, "zero_stage": config.optim.zero_stage,
        **(times.report() if times else {}), "ranks": ranks,
        "total_flos": float(token_flops[1] * state.tokens_seen), "train_flops": float(token_flops[0] * state.tokens_seen),
        "wall_time_s": wall_time_s,
    }
    if train_blocks is not None and len(train_blocks.sources) > 1:
        results["train_sources"] = {
            source.name: {"weight": float(weight), "blocks": len(source.blocks), "blocks_trained": blocks,
                          "tokens_trained": tokens}
            for source, weight, (tokens, blocks) in zip(train_blocks.sources, train_blocks.weights,
                                                        state.source_trained)}
    return results
