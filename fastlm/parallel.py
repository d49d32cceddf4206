"""Slices of a prepare run's input cut at document boundaries, and worker processes that prepare them.

A run's input is a sequence of sources (files, or the rows of one dataset) measured in units (bytes,
rows). ``plan`` cuts it into slices at positions that depend only on the input and the number of
slices asked for, each moved forward to the next document boundary, so a slice never splits a
document and the token stream of the slices in order is the whole input's. ``--shard I/N`` is the
I-th of N such slices; a run with num_proc workers cuts its input (or shard) again into a few slices
per worker.

``prepare_in_processes`` hands slices to worker processes, each writing its slice as a small store
(a part) in the output's temporary directory; the parent joins the parts in input order as they
finish (StoreWriter.append_store: file concatenation and offsets arithmetic) and deletes them, so the
parts on disk stay a few slices' worth.
"""
import bisect
import multiprocessing
import os
import shutil
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, NamedTuple

from fastlm.store import StoreWriter, TokenStore

# Slices per worker: enough that a slow slice does not leave the other workers idle at the end.
_SLICES_PER_WORKER = 4


class Source(NamedTuple):
    """One input: ``size`` units long; ``boundary(position)`` is the first document start at or after
    ``position`` (0 < position < size), ``size`` if none."""

    size: int
    boundary: Callable


class Slice(NamedTuple):
    """Units [start, stop) of sources[source]."""

    source: int
    start: int
    stop: int


def whole(size):
    """A Source that is cut only at its ends (compressed or structured files, whole-file documents)."""
    return Source(size, lambda position: size)


def every_unit(size):
    """A Source that may be cut anywhere (dataset rows)."""
    return Source(size, lambda position: position)


def text_lines(path, marker):
    """A Source for an uncompressed text file whose documents start after ``marker`` (b"\\n" for lines,
    b"\\n\\n" for paragraphs: a blank line ends a paragraph)."""
    size = os.path.getsize(path)

    def boundary(position):
        with open(path, "rb") as f:
            # The marker may end exactly at position: start looking len(marker) bytes before it.
            seek = max(0, position - len(marker))
            f.seek(seek)
            tail = b""
            while True:
                block = f.read(1 << 16)
                if not block:
                    return size
                data = tail + block
                found = data.find(marker)
                if found >= 0:
                    return min(size, seek - len(tail) + found + len(marker))
                tail = data[len(data) - len(marker) + 1 :] if len(marker) > 1 else b""
                seek += len(block)

    return Source(size, boundary)


def plan(sources, parts, shard=(0, 1)):
    """The slices of shard ``shard = (index, count)`` of ``sources``, cut again into about ``parts``
    slices of similar size. Empty slices are left out."""
    index, count = shard
    starts = [0]
    for source in sources:
        starts.append(starts[-1] + source.size)
    total = starts[-1]

    def position(unit):
        """The first document start at or after global unit ``unit``, as (source, offset)."""
        if unit >= total:
            return len(sources), 0
        i = bisect.bisect_right(starts, unit) - 1  # the source holding unit (never an empty one)
        offset = unit - starts[i]
        if offset:
            offset = sources[i].boundary(offset)
        return (i + 1, 0) if offset >= sources[i].size else (i, offset)

    first, last = position(index * total // count), position((index + 1) * total // count)
    low, high = starts[first[0]] + first[1], starts[last[0]] + last[1]
    cuts = [first, *(position(low + k * (high - low) // parts) for k in range(1, parts)), last]
    slices = []
    for (a, a_offset), (b, b_offset) in zip(cuts, cuts[1:]):
        for i in range(a, min(b + 1, len(sources))):
            start = a_offset if i == a else 0
            stop = b_offset if i == b else sources[i].size
            if stop > start:
                slices.append(Slice(i, start, stop))
    return slices


def slice_count(units, num_proc, min_units):
    """How many slices to cut ``units`` into for num_proc workers (1 for one worker)."""
    if num_proc == 1:
        return 1
    return max(1, min(_SLICES_PER_WORKER * num_proc, units // max(1, min_units)))


class Job(NamedTuple):
    """What a worker needs: ``run(slice, writer)`` appends the slice's documents to a StoreWriter."""

    run: Callable
    vocab_size: int


_job = None


def _start_worker(job):
    global _job
    # The parent stops the workers on Ctrl-C; each printing its own KeyboardInterrupt would bury the message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _job = job


def _prepare_part(number, piece, directory):
    output = Path(directory) / f"{number:06d}"
    with StoreWriter(output, vocab_size=_job.vocab_size, record_bytes=True) as writer:
        _job.run(piece, writer)
        writer.close({})
    return str(output)


def prepare_in_processes(job, slices, writer, num_proc, on_part=None):
    """Prepare ``slices`` in ``num_proc`` worker processes and append them to ``writer`` in order;
    ``on_part(store)`` after each. The first error in input order stops every worker and is raised."""
    directory = writer.path / "parts"
    directory.mkdir()
    # fork: the workers start in milliseconds with the tokenizer, encoder and dataset already loaded.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(num_proc, multiprocessing.get_context(method), initializer=_start_worker, initargs=(job,))
    todo = iter(enumerate(slices))
    pending = deque()

    def submit():
        for number, piece in todo:
            pending.append(pool.submit(_prepare_part, number, piece, str(directory)))
            if len(pending) >= 2 * num_proc:
                return

    try:
        submit()
        while pending:
            wait(pending, return_when=FIRST_COMPLETED)
            failed = next((future for future in pending if future.done() and future.exception()), None)
            if isinstance(failed and failed.exception(), BrokenProcessPool):
                raise RuntimeError("a prepare worker process died (killed, or out of memory?); nothing was written")
            if failed is not None:
                raise failed.exception()
            while pending and pending[0].done():
                part = TokenStore.open(pending.popleft().result())
                writer.append_store(part)
                if on_part is not None:
                    on_part(part)
                shutil.rmtree(part.path)
            submit()
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    shutil.rmtree(directory)


def _stop(pool):
    """Cancel what has not started and end the running workers now, before the output is deleted."""
    # ProcessPoolExecutor has no public way to end running workers before Python 3.14.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
