"""Name a rank that stopped, instead of waiting in a collective for gloo's or NCCL's timeout.

A stopped rank (SIGSTOP, a frozen node, a dead process) leaves the others blocked inside a collective, and
gloo does not always give up there at the process group's timeout. So every rank runs a thread that
bumps its own counter in the rendezvous store (the TCPStore every launcher sets up) a few times per
--ddp_timeout; rank 0 watches all counters. A rank whose counter has not moved for --ddp_timeout seconds
(by the watcher's own clock: nodes' clocks may differ) is named by rank 0, which posts the verdict and
exits; the other ranks read the verdict and exit too. When rank 0 itself stops, the store it hosts stops
answering and the others say so. A rank that finishes posts that it is done, so it is never mistaken for
a stopped one.
"""
import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

_PREFIX = "fastlm/watchdog"


class RankWatchdog:
    def __init__(self, timeout, *, rank, world_size, store):
        self.timeout, self.rank, self.world_size, self.store = float(timeout), rank, world_size, store
        self.period = max(0.25, min(self.timeout / 4, 30.0))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastlm-rank-watchdog", daemon=True)

    @classmethod
    def start(cls, timeout, *, rank, world_size):
        """A running watchdog over the default process group's store, or None with a single rank."""
        if world_size == 1:
            return None
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=timeout))
        watchdog = cls(timeout, rank=rank, world_size=world_size, store=store)
        watchdog._thread.start()
        return watchdog

    def stop(self):
        """This rank is done with collectives: it may go quiet without being reported."""
        self._done.set()
        self._thread.join()
        try:
            self.store.set(f"{_PREFIX}/done/{self.rank}", "1")
        except RuntimeError:
            pass  # rank 0 has exited already: nobody is watching

    def _watch(self):
        beats, last_seen = 0, {}
        try:
            while not self._done.wait(self.period):
                beats += 1
                self.store.set(f"{_PREFIX}/beat/{self.rank}", str(beats))
                if self.rank == 0:
                    stopped = self._stopped_ranks(last_seen)
                    if stopped:
                        self.store.set(f"{_PREFIX}/stopped", ",".join(map(str, stopped)))
                        self._exit(stopped)
                elif self.store.check([f"{_PREFIX}/stopped"]):
                    self._exit(self.store.get(f"{_PREFIX}/stopped").decode().split(","), seen_by_rank0=True)
        except RuntimeError:  # the store does not answer within the timeout: its host, rank 0, is gone
            self._exit(["0"], store_gone=True)

    def _stopped_ranks(self, last_seen):
        now, stopped = time.monotonic(), []
        for rank in range(1, self.world_size):
            if self.store.check([f"{_PREFIX}/done/{rank}"]):
                continue
            beat = self.store.get(f"{_PREFIX}/beat/{rank}") if self.store.check([f"{_PREFIX}/beat/{rank}"]) else b""
            if last_seen.get(rank, (None,))[0] != beat:
                last_seen[rank] = (beat, now)
            elif now - last_seen[rank][1] > self.timeout:
                stopped.append(rank)
        return stopped

    def _exit(self, stopped, *, seen_by_rank0=False, store_gone=False):
        names = ", ".join(map(str, stopped))
        why = ("the rendezvous store it hosts does not answer" if store_gone
               else "reported by rank 0" if seen_by_rank0 else f"no sign of life for {self.timeout:g} s")
        print(f"[fastlm] rank {self.rank}: rank(s) {names} stopped responding ({why}; --ddp_timeout "
              f"{self.timeout:g} s): stopped, hung or dead. Stopping this rank too; raise --ddp_timeout if they "
              "were only slow.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the main thread may be blocked inside a collective that never returns
