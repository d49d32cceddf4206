"""Every collective and rank coordination of the runner: the distributed environment, sums over ranks, work done
on one rank (or once per filesystem) while the others wait, and leaving the process group in order.

Tensors handed to a collective live on the engine's device: on GPUs the process group is NCCL, which cannot
reduce CPU tensors.
"""
import datetime
import itertools
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from fastlm.train.errors import ConfigError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment():
    """(rank, world_size, local_rank); plain `python` gets single-process defaults, which
    deepspeed.init_distributed needs (it otherwise tries MPI discovery and fails)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def init(runtime, *, device, local_rank):
    """Join the process group. The rank watchdog names a stopped rank after --ddp_timeout; the process group's
    own timeout is only the backstop behind it (gloo does not always honour it), so it comes later."""
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        if runtime.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = runtime.tf32
    _skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend=runtime.ddp_backend or ("gloo" if device == "cpu" else "nccl"),
                               timeout=datetime.timedelta(seconds=2 * runtime.ddp_timeout + 60))


def _skip_deepspeed_shm_op():
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (25-45 s, more when another
    venv's build sits in the shared torch_extensions cache) in every init_distributed, but only
    inference_all_reduce uses it: training reduces through torch.distributed. Skip building it, and keep
    any op that does get compiled (a DeepSpeed JSON optimizer) in a cache of this venv's own."""
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def _ranks():
    """The process group's size; 1 without one (a model evaluated outside a run)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_in_place(tensor):
    """Sum a device tensor over all ranks, in place (nothing to do on one rank)."""
    if _ranks() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_targets(targets, *, device, world_size):
    """A step's target tokens over all ranks (at least 1: a step without targets has a zero gradient), as a
    tensor left on the device: dividing the loss by it needs no host sync."""
    if world_size == 1:
        return max(targets, 1)
    total = torch.tensor(float(targets), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.clamp_(min=1)


def sum_over_ranks(values, *, dtype, device, world_size):
    """`values` summed elementwise over all ranks, returned on the CPU (built on `device`, the engine's)."""
    totals = torch.as_tensor(values, dtype=dtype, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    return totals.cpu()


def gather(value):
    """Every rank's `value` (any picklable object of our own making), in rank order."""
    world_size = _ranks()
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def rank_report(seen, eval_loss, *, world_size, device):
    """Cross-rank checks for results.json: blocks trained in the first epoch of this run, how many of them
    more than one rank trained on (0 when the shares are disjoint), and each rank's final eval loss."""
    counts = sum_over_ranks(seen, dtype=torch.int32, device=device, world_size=world_size)
    return {"blocks_trained": int((counts > 0).sum()), "overlapping_blocks": int((counts > 1).sum()),
            "eval_loss": gather(eval_loss)}


def barrier():
    if dist.get_world_size() > 1:
        dist.barrier()


def rank0_then_others(work, *, rank, what):
    """Run work() on rank 0 while the other ranks wait; a failure there stops every rank, naming it."""
    if dist.get_world_size() == 1:
        work()
        return
    # Every rank makes the same calls in the same order, so the count names this one alike on all of them.
    _run_then_wait(work, {0}, f"fastlm/rank0/{next(_RANK0_CALLS)}", rank=rank, what=what)


_RANK0_CALLS = itertools.count()
_MARKER = ".fastlm-who-shares-{token}-rank{rank}"


def once_per_filesystem(work, directory, *, rank, what):
    """Run work() (which writes under `directory`) once for every filesystem that holds `directory`, on
    the lowest rank that sees it, while the other ranks wait; a failure anywhere stops every rank.

    Nodes with node-local disks do not see each other's `directory` (Megatron-LM #907, #1355), so each
    node prepares its own copy; where they share it, rank 0 alone writes. Found without user flags:
    the first rank of each node (LOCAL_RANK 0) leaves a marker file named with a token of this run in
    `directory`, and after a barrier every rank's preparer is the lowest rank whose marker it sees.
    """
    world_size = dist.get_world_size()
    if world_size == 1:
        work()
        return
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    token = token[0]
    marker = Path(directory) / _MARKER.format(token=token, rank=rank)
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    seen = [int(p.name.rsplit("rank", 1)[1]) for p in Path(directory).glob(_MARKER.format(token=token, rank="*"))]
    preparer = min(seen, default=rank)
    preparers = [None] * world_size
    dist.all_gather_object(preparers, preparer)  # also a barrier: every rank has looked
    marker.unlink(missing_ok=True)
    if rank == preparer and rank != 0:
        print(f"[fastlm] rank {rank}: {directory} is not shared with rank 0 (a node-local disk); "
              f"this node prepares its own copy", flush=True)
    _run_then_wait(work, set(preparers), f"fastlm/{token}", rank=rank, what=what)


# How often a waiting rank asks the rendezvous store whether the work it waits for is done.
_POLL_S = 0.25


def _run_then_wait(work, workers, key, *, rank, what):
    """work() on the ranks in `workers`; then every rank waits for each worker's outcome, and a failure on
    any stops every rank, naming it (a ConfigError as the same ConfigError: one line and exit status 2
    on every rank).

    The wait goes through the rendezvous store, not a collective: preparing a large corpus may take far
    longer than --ddp_timeout lets a collective wait. It polls: a blocking store.wait holds the store
    client's lock all along, which would stall the rank watchdog's heartbeats through the same client
    and get the waiting rank reported as stopped.
    """
    store = dist.distributed_c10d._get_default_store()
    if rank in workers:
        try:
            work()
        except Exception as error:
            failure = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
            store.set(f"{key}/{rank}", json.dumps([isinstance(error, ConfigError), failure]))
            raise
        store.set(f"{key}/{rank}", json.dumps([False, ""]))
    for worker in sorted(workers):
        while not store.check([f"{key}/{worker}"]):
            time.sleep(_POLL_S)
        config_error, failure = json.loads(store.get(f"{key}/{worker}"))
        if config_error:
            raise ConfigError(failure)  # reads the same on every rank
        if failure:
            raise RuntimeError(f"rank {worker} could not {what}: {failure}")


def shutdown(world_size, watchdog, status=0):
    """With several ranks, torch's gloo can abort at interpreter exit after a clean run (SIGABRT in
    1-4 of 10 runs): leave the process group in order and exit without running the interpreter's
    teardown. The watchdog stops first: a rank that has finished must not be reported as stopped."""
    if watchdog:
        watchdog.stop()
    if world_size == 1:
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
