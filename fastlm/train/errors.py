"""The runner's kinds of failure, and its one-line warnings.

A ConfigError is the user's to fix before anything starts (one line, exit status 2); Diverged stops a run
whose loss or gradient norm stopped being finite, CheckpointFailed one that could not write a checkpoint
(exit status 1). Each prints one line, once.
"""
import os
import sys
import time

FAIL_WAIT_S = 10


class ConfigError(ValueError):
    """A contradictory or impossible run configuration, found before anything starts."""


class Diverged(RuntimeError):
    """The training loss or gradient norm stopped being finite; nothing from that step on was saved."""


class CheckpointFailed(RuntimeError):
    """A checkpoint or the final model could not be written (disk full, file-size limit); what was there is kept."""


def is_rank0():
    return os.environ.get("RANK", "0") == "0"


def warn(message):
    """One warning line, from rank 0 only (every rank parses the same flags)."""
    if is_rank0():
        print(f"[fastlm] warning: {message}", file=sys.stderr, flush=True)


def fail(message, status):
    """Print `fastlm train: error: <message>` once (rank 0) and exit with `status`."""
    if is_rank0():
        print(f"fastlm train: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    else:
        # A launcher (torchrun, deepspeed) stops every rank when the first one exits: a rank that got here
        # before rank 0 waits, or rank 0 would be killed before it prints. Rank 0's exit ends the wait.
        time.sleep(FAIL_WAIT_S)
    sys.exit(status)
