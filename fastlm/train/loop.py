"""The training loop: engine(batch) -> engine.backward(loss) -> engine.step(), with token-weighted steps.

Every optimizer step's gradient is that of (sum of token losses over all its micro batches and ranks) /
(target tokens of the whole step), however the step is split (transformers #34191): the step's micro
batches are fetched first and their targets counted (one all_reduce), and a micro batch's loss is its summed
token NLL x accumulation x ranks / that count, which undoes DeepSpeed's division by the accumulation steps
(engine.backward) and its average over ranks (the gradient all-reduce, ZeRO 0-3). Logging and the divergence
check (metrics.StepLog), evaluation and checkpoints are calls out of the loop, at the steps schedule.Intervals
names.
"""
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastlm.packing import IGNORE_INDEX
from fastlm.train import dist
from fastlm.train.model import model_inputs, position_offset
from fastlm.train.sampling import TrainBatches


@dataclass
class TrainState:
    """Where a run is, and what it has summed: all a checkpoint needs to resume it exactly.

    window: [NLL, targets, tokens] summed over ranks since the last log line; source_window: per training
    source of a mixture, [NLL, targets, tokens, blocks] since the last log line; source_trained: per source,
    [tokens, blocks] in all."""
    step: int = 0
    epoch: int = 0
    sample: int = 0  # the epoch's sample position at the last step boundary
    tokens_seen: int = 0
    train_loss_sum: float = 0.0
    train_loss_count: int = 0
    window: list = field(default_factory=lambda: [0.0, 0, 0])
    source_window: list = field(default_factory=list)
    source_trained: list = field(default_factory=list)

    @classmethod
    def start(cls, n_sources):
        return cls(source_window=[[0.0] * 4 for _ in range(n_sources)],
                   source_trained=[[0, 0] for _ in range(n_sources)])

    def resumed(self, client_state):
        """This state with a checkpoint's client state laid over it (keys it does not hold stay as they are)."""
        return dataclasses.replace(self, **{f.name: client_state[f.name] for f in dataclasses.fields(self)
                                            if f.name in client_state})


@dataclass
class LoopTimes:
    """Where the loop's time went, for results.json."""
    data: float = 0.0  # waiting for batches
    steps: float = 0.0  # forward, backward, optimizer, and what follows a step
    startup: float = 0.0  # the first fetch of each epoch (DataLoader workers starting)
    first_step_s: float = None  # from the start of the run to the end of its first step
    tokens: int = 0
    steps_done: int = 0

    def report(self):
        loop = self.data + self.steps + self.startup
        done = self.steps_done
        return {"data_time_fraction": self.data / (self.data + self.steps) if done else 0.0,
                "dataloader_startup_s": self.startup, "time_to_first_step_s": self.first_step_s,
                "train_runtime_s": loop, "train_steps_per_s": done / loop if done else 0.0,
                "train_tokens_per_s_per_rank": self.tokens / loop if done else 0.0}


class Trainer:
    """Trains `engine` from `state` to `total_steps`. `clip` is the max gradient norm where the loop clips itself
    (None: DeepSpeed clips and reports the norm); `after_step(epoch_end)` logs, evaluates and saves."""

    def __init__(self, engine, train_blocks, state, *, task, optim, seed, num_workers, masker, rank, world_size,
                 total_steps, log, clip, after_step, start_time, compiled=False):
        self.engine, self.train_blocks, self.state, self.log = engine, train_blocks, state, log
        self.task, self.optim, self.seed, self.num_workers, self.masker = task, optim, seed, num_workers, masker
        self.rank, self.world_size, self.total_steps, self.clip = rank, world_size, total_steps, clip
        self.after_step, self.start_time = after_step, start_time
        self.times = LoopTimes()
        self.compiled = compiled
        self.first_epoch, self.first_epoch_trained = state.epoch, None

    def run(self):
        """Train to total_steps; returns the loop's LoopTimes."""
        state, accum = self.state, self.optim.gradient_accumulation_steps
        self.engine.train()
        self.loop_start = time.perf_counter()
        if state.step >= self.total_steps:
            return self.times
        for dataset, first, batches in self._step_batches():
            t0 = time.perf_counter()
            step_nll, targets, tokens, grad_norm, lr = self._optimizer_step(batches, first)
            state.step += 1
            last = first + accum - 1
            epoch_end = last + 1 == len(dataset)
            state.epoch, state.sample = (state.epoch + 1, 0) if epoch_end else (state.epoch, dataset.end_position(last))
            self._count(dataset, last, tokens)
            self.log.step_done(step_nll, targets=targets, tokens=tokens, grad_norm=grad_norm, lr=lr)
            self.after_step(epoch_end, dataset.new_source_epochs(last) if self.rank == 0 else ())
            self.times.steps += time.perf_counter() - t0
            if state.step >= self.total_steps:
                return self.times

    def _optimizer_step(self, batches, first):
        """One optimizer step over its micro batches: (summed token NLL on the device, this rank's targets and
        tokens, the gradient norm, the learning rate it stepped with)."""
        engine, accum, shift = self.engine, self.optim.gradient_accumulation_steps, self.task == "clm"
        targets = sum(_targets(batch["labels"], shift=shift) for batch in batches)
        loss_scale = accum * self.world_size / dist.sum_targets(targets, device=engine.device,
                                                                world_size=self.world_size)
        step_nll, tokens, grad_norm = 0.0, 0, None
        config, dtype = engine.module.config, engine.module.dtype
        for j, batch in enumerate(batches, start=first):
            sources = batch.pop("source", None)  # a mixture's row sources
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")  # the engine's module is heads.LMLoss: each row's summed NLL, targets
            rows_nll, rows_targets = engine(labels=labels, **model_inputs(batch, config, task=self.task, dtype=dtype))
            nll = rows_nll.sum()
            if sources is not None:
                self.log.add_source_rows(sources.to(engine.device), rows_nll.detach(), rows_targets,
                                         batch["attention_mask"].sum(1))
            engine.backward(nll * loss_scale)
            if j == first + accum - 1:
                if self.clip is not None:  # gradients reduced over ranks: clip them
                    grad_norm = _clip_gradients(engine.module, self.clip)
                # The step's own rate, as Trainer logs it: engine.step() moves the schedule on to the next.
                lr = engine.get_lr()[0]
            engine.step()
            step_nll += nll.detach()
        # DeepSpeed skips the update of a step whose gradients are not finite, and reports its norm as inf.
        # With fp16's dynamic loss scaling that is routine (the scale drops); in bf16 or fp32 it is divergence.
        if self.clip is None and not (self.optim.precision == "fp16" and not engine.was_step_applied()):
            grad_norm = engine.get_global_grad_norm()
        return step_nll, targets, tokens, grad_norm, lr

    def _step_batches(self):
        """(dataset, index of the step's first micro batch, the step's micro batches) for every step from the
        state's position on, epoch after epoch; times the waits for batches."""
        state, accum = self.state, self.optim.gradient_accumulation_steps
        while True:
            dataset = TrainBatches(self.train_blocks, micro_batch=self.optim.per_device_train_batch_size,
                                   accumulation=accum, rank=self.rank, world_size=self.world_size, epoch=state.epoch,
                                   seed=self.seed, start=state.sample, masker=self.masker,
                                   position_offset=position_offset(self.engine.module.config))
            if len(dataset) == 0:  # resumed with a larger global batch than the epoch has samples left
                if self.rank == 0:
                    print(f"[fastlm] epoch {state.epoch}: {len(self.train_blocks) - state.sample} samples left, "
                          f"fewer than a global batch of {dataset.global_batch}; starting epoch {state.epoch + 1}",
                          flush=True)
                state.epoch, state.sample = state.epoch + 1, 0
                continue
            # A private generator for worker seeds: drawing them from the global torch RNG would shift the
            # dropout stream between a resumed and an uninterrupted run.
            loader = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.engine.device.type == "cuda",
                                     generator=torch.Generator().manual_seed(self.seed + state.epoch)))
            for first in range(0, len(dataset), accum):
                fetch_start = time.perf_counter()
                batches = [next(loader) for _ in range(accum)]
                waited = time.perf_counter() - fetch_start
                # The first fetch of an epoch includes starting the workers: a one-off, reported on its own.
                if first == 0:
                    self.times.startup += waited
                else:
                    self.times.data += waited
                yield dataset, first, batches

    def _count(self, dataset, last, tokens):
        times = self.times
        times.tokens += tokens
        times.steps_done += 1
        if times.first_step_s is None:
            times.first_step_s = time.time() - self.start_time
            if self.compiled and self.rank == 0:
                print(f"[fastlm] --torch_compile: the first step took {time.perf_counter() - self.loop_start:.1f} s, "
                      "compiling included", flush=True)
        if dataset.epoch == self.first_epoch:
            self.first_epoch_trained = (dataset, last + 1)

    def first_epoch_positions(self):
        """The sample positions this rank trained in the run's first epoch (for the cross-rank report)."""
        if self.first_epoch_trained is None:
            return np.zeros(0, dtype=np.int64)
        dataset, n = self.first_epoch_trained
        return np.concatenate([dataset.positions(j) for j in range(n)])


def _targets(labels, *, shift):
    """Target tokens of a micro batch (labels on the host): CLM's first label of a row is never one."""
    return int((labels[:, 1:] if shift else labels).ne(IGNORE_INDEX).sum())


def clipping_in_the_loop(ds_config, optim):
    """The max gradient norm the loop clips to itself (0: none), taken out of ds_config; None where
    DeepSpeed clips. DeepSpeed's ZeRO-0 fp32 path clips with torch and throws the norm away, which the
    divergence check and the log need: there the loop clips instead, by the same rule."""
    autocast = (ds_config.get("torch_autocast") or {}).get("enabled")
    if optim.zero_stage != 0 or optim.precision != "fp32" or autocast:
        return None
    clip, ds_config["gradient_clipping"] = ds_config.get("gradient_clipping", 0.0), 0.0
    return clip


def _clip_gradients(module, clip):
    """The gradients' total 2-norm (a tensor: no host sync), after clipping them to `clip` (0: no clipping)."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm
