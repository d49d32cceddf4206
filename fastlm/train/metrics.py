"""The loop's bookkeeping: each step's token NLL, targets and tokens, summed over ranks at a log line, checked
for divergence, and written to metrics.jsonl (and the --report_to trackers) as token-weighted losses.

Each step's summed token NLL stays on the device until a log line, a checkpoint or the end needs it, so the
loop makes no host sync of its own per step; then one all_reduce sums the pending steps over ranks, a step
whose loss or gradient norm is not finite stops the run (Diverged, on every rank alike: the sums and norms
are global), and the sums move into the TrainState's window. The window holds global sums, so a checkpoint
between two log lines resumes it on any rank count.
"""
import json
import math
import time

import torch

from fastlm.train import dist
from fastlm.train.errors import Diverged

PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def check_finite(steps, nll, targets, norms):
    """Raise Diverged at the first step whose loss or gradient norm is not finite."""
    for step, step_nll, step_targets, norm in zip(steps, nll, targets, norms):
        if not (math.isfinite(step_nll) and (norm is None or math.isfinite(norm))):
            loss = step_nll / step_targets if step_targets else step_nll
            raise Diverged(f"training diverged at step {step}: loss {loss}, gradient norm {norm}")


class StepLog:
    def __init__(self, state, *, device, rank, metrics_path, bar, flops_per_token, world_size, trackers,
                 source_names=("train",)):
        self.state, self.device, self.rank, self.world_size = state, device, rank, world_size
        self.trackers = trackers  # the --report_to trackers (trackers.Trackers; none open on other ranks)
        self.metrics_path, self.bar, self.flops_per_token = metrics_path, bar, flops_per_token
        self.pending = []  # (step, summed NLL on the device, targets, tokens, grad norm) since the last flush
        self.peak = None
        if device.type == "cuda":
            name = torch.cuda.get_device_name()
            self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.since = time.perf_counter()
        self.grad_norm = None
        self.lr = None  # the learning rate of the last step
        self.source_names = list(source_names)
        # A mixture's [NLL, targets, tokens, blocks] of each source since the last flush, on this rank's device
        self.source_pending = torch.zeros((len(self.source_names), 4), dtype=torch.float64, device=device)

    def add_source_rows(self, sources, nll, targets, tokens):
        """A mixture micro batch: each row's source, summed NLL, targets and tokens (device tensors)."""
        rows = torch.stack([nll, targets.double(), tokens.double(), torch.ones_like(nll)], dim=1)
        self.source_pending.index_add_(0, sources, rows)

    def step_done(self, nll, *, targets, tokens, grad_norm, lr):
        self.pending.append((self.state.step, nll, targets, tokens, grad_norm))
        self.lr = lr
        if self.rank == 0:
            self.bar.update(1)

    def flush(self):
        """Sum the pending steps over ranks, check them (check_finite), and add them to the state's window."""
        if not self.pending:
            return
        steps, nll, targets, tokens, norms = zip(*self.pending)
        self.pending = []
        totals = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device) for x in nll]),
                              torch.tensor(targets, dtype=torch.float64, device=self.device),
                              torch.tensor(tokens, dtype=torch.float64, device=self.device)])
        nll, targets, tokens = dist.sum_in_place(totals).tolist()
        norms = [None if norm is None else float(norm) for norm in norms]
        check_finite(steps, nll, targets, norms)
        window = self.state.window
        window[0], window[1], window[2] = window[0] + sum(nll), window[1] + int(sum(targets)), window[2] + int(sum(tokens))
        self.grad_norm = norms[-1]
        if len(self.source_names) > 1:  # global sums too, so a checkpoint resumes them on any rank count
            for window, sums in zip(self.state.source_window, dist.sum_in_place(self.source_pending).tolist()):
                window[:] = [a + b for a, b in zip(window, sums)]
            self.source_pending.zero_()

    def write_window(self):
        """The log line of the steps since the last one: token-weighted loss, the last step's learning rate
        (the rate it stepped with, as Trainer logs it), tokens/s."""
        self.flush()
        state = self.state
        nll_sum, targets, tokens = state.window
        seconds = time.perf_counter() - self.since
        state.tokens_seen += tokens
        state.train_loss_sum += nll_sum
        state.train_loss_count += targets
        record = {"epoch": state.epoch, "loss": nll_sum / targets if targets else None, "lr": self.lr,
                  "tokens_per_s": tokens / seconds, "tokens_seen": state.tokens_seen}
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens / seconds / (self.peak * self.world_size)
        if len(self.source_names) > 1:
            for name, (source_nll, source_targets, n_tokens, blocks), trained in zip(
                    self.source_names, state.source_window, state.source_trained):
                record[f"train_{name}_loss"] = source_nll / source_targets if source_targets else math.nan
                record[f"train_{name}_tokens"] = int(n_tokens)
                trained[0] += int(n_tokens)
                trained[1] += int(blocks)
            state.source_window = [[0.0] * 4 for _ in self.source_names]
        self.write(record)
        if self.rank == 0 and targets:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        state.window = [0.0, 0, 0]
        self.since = time.perf_counter()

    def write(self, record):
        if self.rank == 0:
            record = {"step": self.state.step, **record}
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)
