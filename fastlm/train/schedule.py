"""When things happen in a run: the learning-rate schedule over its optimizer steps, and the steps at which it
logs, evaluates and saves (HF's *_strategy / *_steps flags)."""
import json
import math

import torch
from transformers import get_scheduler

from fastlm.train.errors import ConfigError


def lr_schedule(optim, total_steps):
    """transformers' get_scheduler for --lr_scheduler_type, as a function of the optimizer (what
    deepspeed.initialize takes). --warmup_steps below 1 is a fraction of the run, as in TrainingArguments.
    (DeepSpeed's WarmupDecayLR warms up for at least two steps at lr 0 and rejects warmup 0.)"""
    warmup = optim.warmup_steps if optim.warmup_steps >= 1 else math.ceil(optim.warmup_steps * total_steps)

    def schedule(optimizer):
        return get_scheduler(optim.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup),
                             num_training_steps=total_steps, scheduler_specific_kwargs=dict(optim.lr_scheduler_kwargs))

    return schedule


def check_lr_schedule(optim, total_steps):
    """Build the schedule once on a stand-in optimizer, so missing or unknown --lr_scheduler_kwargs are a
    ConfigError before the model is built rather than a traceback inside deepspeed.initialize."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.learning_rate)
    try:
        lr_schedule(optim, total_steps)(stand_in)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--lr_scheduler_type {optim.lr_scheduler_type} with --lr_scheduler_kwargs "
                          f"{json.dumps(dict(optim.lr_scheduler_kwargs))}: {error}") from None


class Intervals:
    """When to log, evaluate and save, from the *_strategy / *_steps flags. A steps value below 1 is a
    fraction of the run's optimizer steps, as in TrainingArguments. The last step always logs (the
    final train loss needs it); the evaluation after the last step is the final one, not an interval's."""

    def __init__(self, logging, evaluation, checkpoint, total_steps):
        self.total_steps = total_steps
        self.first = logging.logging_first_step
        self.log_every = self._every(logging.logging_strategy, logging.logging_steps, "logging_steps")
        self.eval_every = self._every(evaluation.eval_strategy, evaluation.eval_steps, "eval_steps")
        self.save_every = self._every(checkpoint.save_strategy, checkpoint.save_steps, "save_steps")

    @classmethod
    def of(cls, config, total_steps):
        return cls(config.logging, config.evaluation, config.checkpoint, total_steps)

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
