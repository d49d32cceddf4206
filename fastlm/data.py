"""The runner's data plan: training and evaluation sources (stores, prepared from text on first use),
their packing into blocks, and the order batches take them in (epoch-seeded shuffling, disjoint shares
per rank, MLM masks).

Batches are numpy; the DataLoader turns the arrays into tensors. Batches are keyed by global ids
(epoch, micro-batch number, rank) so a run is reproducible whatever the DataLoader worker count, and a
resumed run can restart at any micro-batch without replaying the ones before it.
"""
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fastlm.config import ConfigError
from fastlm.tokenizer import padding_id, special_ids

def split_documents(tokens, offsets, eval_fraction):
    """Hold out the last `eval_fraction` of the documents: ((tokens, offsets), (tokens, offsets)).

    Token arrays are views (a memmap stays a memmap, nothing is copied); offsets are rebased copies.
    """
    n_docs = len(offsets) - 1
    n_eval = int(round(n_docs * eval_fraction))
    if not 0 < eval_fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {eval_fraction}")
    if n_eval == 0 or n_eval == n_docs:
        raise ValueError(
            f"cannot hold out {eval_fraction * 100:g}% of {n_docs} documents for evaluation "
            f"(it leaves {n_docs - n_eval} for training and {n_eval} for evaluation); "
            "give an evaluation set or change the fraction"
        )
    cut = n_docs - n_eval
    return _doc_range(tokens, offsets, 0, cut), _doc_range(tokens, offsets, cut, n_docs)


def _doc_range(tokens, offsets, first, last):
    start, stop = int(offsets[first]), int(offsets[last])
    return tokens[start:stop], np.asarray(offsets[first : last + 1], dtype=np.int64) - start


def epoch_order(n_samples, *, seed, epoch):
    """The order of an epoch's samples: sample position s of `epoch` is block epoch_order(...)[s].

    A function of (seed, epoch) only, so the sample at a global position is the same whatever the
    micro batch, accumulation or rank count (MosaicML Streaming's "elastic determinism").
    """
    return np.random.Generator(np.random.PCG64([epoch, seed])).permutation(n_samples)


class TrainBatches:
    """Map-style dataset: item j is this rank's j-th micro batch of `epoch`, from sample position `start`.

    An optimizer step takes the next global_batch = micro_batch x accumulation x world_size sample
    positions of the epoch order; within the step, micro batch m of rank r takes the micro_batch positions
    starting at (m * world_size + r) * micro_batch. So a step trains on the same samples whatever the
    split of its global batch, ranks see disjoint blocks, and a checkpoint's data position is one number:
    the epoch's sample position at a step boundary. An epoch ends when fewer than a global batch of
    positions remain (the tail is dropped, like DistributedSampler(drop_last=True)), so gradient
    accumulation never straddles two epochs. MLM masks are keyed by (seed, epoch, sample position): a
    sample gets the same mask in any layout.
    """

    def __init__(self, blocks, *, micro_batch, accumulation, rank, world_size, epoch, seed, start=0,
                 masker=None, position_offset=0):
        self.blocks, self.micro_batch, self.accumulation, self.position_offset = blocks, micro_batch, accumulation, position_offset
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, epoch, start
        self.masker = masker
        self.global_batch = micro_batch * accumulation * world_size
        self.steps = max(0, (len(blocks) - start) // self.global_batch)
        self.order = epoch_order(len(blocks), seed=seed, epoch=epoch)

    def __len__(self):
        return self.steps * self.accumulation

    def end_position(self, j):
        """The epoch's sample position once micro batch j (the last of its step) has been trained."""
        return self.start + (j // self.accumulation + 1) * self.global_batch

    def positions(self, j):
        step, micro = divmod(j, self.accumulation)
        first = self.start + step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch)

    def indices(self, j):
        return self.order[self.positions(j)]

    def __getitem__(self, j):
        if not 0 <= j < len(self):
            raise IndexError(j)
        positions = self.positions(j)
        # Rows in block order read the memmap forward; the masks follow each row's own position.
        rows = np.argsort(self.order[positions], kind="stable")
        positions = positions[rows]
        batch = self.blocks.gather(self.order[positions])
        if self.masker is not None:
            masked = [self.masker(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], epoch=self.epoch,
                                  batch_index=int(p)) for i, p in enumerate(positions)]
            batch["input_ids"] = np.concatenate([ids for ids, _ in masked])
            batch["labels"] = np.concatenate([labels for _, labels in masked])
        return _offset_positions(batch, self.position_offset)


def _offset_positions(batch, offset):
    """Packed documents restart position_ids at 0; RoBERTa-style models count positions from
    padding_idx + 1, so they need the offset added."""
    if offset and "position_ids" in batch:
        batch["position_ids"] += offset
    return batch


def eval_batches(blocks, *, batch_size, rank, world_size, masker=None, position_offset=0):
    """Yield this rank's evaluation batches as (batch, counts) pairs, covering every block exactly once.

    Ranks take contiguous shares; the last batch may be short. Every rank yields the same number of
    batches (ZeRO-3 gathers parameters collectively, so all ranks must run the same forward passes): a
    rank with fewer real batches repeats one with counts=False, to be ignored.
    MLM masks are fixed (Masker.mask_fixed keys each row's masks by its tokens), so they do not depend
    on the batch size, the rank count or the step at which the evaluation runs.
    """
    n = len(blocks)
    if n == 0:
        raise ValueError("the evaluation set holds no blocks (is it shorter than one block?)")
    share = -(-n // world_size)
    first, last = min(rank * share, n), min((rank + 1) * share, n)
    for step in range(-(-share // batch_size)):
        lo = first + step * batch_size
        hi = min(lo + batch_size, last)
        counts = lo < hi
        batch = blocks.gather(np.arange(lo, hi) if counts else np.arange(1))
        if masker is not None:
            batch["input_ids"], batch["labels"] = masker.mask_fixed(batch["input_ids"], batch["attention_mask"])
        yield _offset_positions(batch, position_offset), counts


# --- sources: stores, prepared on first use -------------------------------------------------------

# Bump when what a cached store holds for the same key changes (its readers or encoding).
_CACHE_FORMAT = 2


def cache_root(args):
    """Where prepared stores live: --cache_dir, else one user cache shared by every run (like datasets'
    cache), so a second run with a new --output_dir does not tokenize the same text again."""
    if args.cache_dir:
        return Path(args.cache_dir)
    base = os.environ.get("FASTLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm"
    return Path(base) / "stores"


def _path_identity(name):
    """A local file as (resolved path, size, mtime); anything else as given."""
    path = Path(name)
    if not path.is_file():
        return str(name)
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


def _tokenizer_identity(spec):
    """What the tokenizer computes (its whole serialised pipeline), wherever it is loaded from: a run that
    evaluates a fine-tuned output_dir reuses the stores its training run made from the original model."""
    from fastlm.tokenizer import load_tokenizer

    try:
        backend = load_tokenizer(spec).backend_tokenizer.to_str()
    except (OSError, ValueError, TypeError):
        return _path_identity(spec)  # not loadable: prepare will say why
    return hashlib.sha256(backend.encode()).hexdigest()


def _cache_key(args):
    """Prepared stores are reused while the sources, the tokenizer and the preparation settings are
    unchanged."""
    sources = [_path_identity(name) for name in (args.train_file, args.validation_file) if name]
    tokenizer = None if args.train_tokenizer else args.tokenizer_name or args.model_name_or_path
    key = [_CACHE_FORMAT, sources, args.dataset_name, args.dataset_config_name,
           _tokenizer_identity(tokenizer) if tokenizer else None, args.train_tokenizer,
           args.vocab_size if args.train_tokenizer else None, args.doc_boundary, _keep_blank(args),
           args.keep_linebreaks]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _keep_blank(args):
    # run_clm/run_mlm tokenize whitespace-only rows like any other; run_mlm --line_by_line drops them.
    return not (args.skip_blank_lines or args.line_by_line)


def open_or_prepare(args, rank):
    """(train store or None, eval store or None). With text sources, rank 0 prepares them into the cache
    while the other ranks wait, then everyone opens the same stores."""
    from fastlm.store import TokenStore

    if args.train_store or args.eval_store:
        return tuple(TokenStore.open(path) if path else None for path in (args.train_store, args.eval_store))
    cache = cache_root(args) / _cache_key(args)
    train_dir, eval_dir = cache / "train", cache / "validation"
    def prepare_locked():
        with _locked(cache):
            _prepare_into(args, train_dir, eval_dir)

    rank0_then_others(prepare_locked, rank=rank, what="prepare the data")
    return tuple(TokenStore.open(path) if path.is_dir() else None for path in (train_dir, eval_dir))


@contextlib.contextmanager
def _locked(cache):
    """One preparer per cache entry at a time, across runs: a second run waits, then finds the stores ready."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rank0_then_others(work, *, rank, what):
    """Run work() on rank 0 while the other ranks wait; a failure there stops every rank, naming it.

    The others wait in the rendezvous store, not in a collective: preparing a large corpus may take far
    longer than --ddp_timeout lets a collective wait, and that wait must not fail."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        work()
        return
    store, key = dist.distributed_c10d._get_default_store(), f"fastlm/rank0/{what}"
    if rank == 0:
        try:
            work()
        except Exception as error:
            store.set(key, f"{type(error).__name__}: {error}")
            raise
        store.set(key, "")
        return
    store.wait([key], datetime.timedelta(days=7))
    failure = store.get(key).decode()
    if failure:
        raise RuntimeError(f"rank 0 could not {what}: {failure}")


def _prepare_into(args, train_dir, eval_dir):
    from fastlm.prepare import prepare
    from fastlm.store import TokenStore

    def ready(path):
        if args.overwrite_cache:
            return False
        try:
            TokenStore.open(path)
            return True
        except ValueError:
            return False

    # Special tokens as the tutorial's tokenizer(...) call adds them (<s> ... </s> per RoBERTa document).
    # overwrite: only a store that failed to open (say a run killed while preparing) or --overwrite_cache.
    common = dict(doc_boundary=args.doc_boundary, add_special_tokens=True, progress=True, overwrite=True,
                  keep_blank=_keep_blank(args), keep_linebreaks=args.keep_linebreaks,
                  num_proc=args.preprocessing_num_workers or 1)
    if args.dataset_name:
        common.update(dataset_name=args.dataset_name, dataset_config=args.dataset_config_name)
    tokenizer = None if args.train_tokenizer else (args.tokenizer_name or args.model_name_or_path)
    if (args.train_file or args.dataset_name) and not ready(train_dir):
        sources = [args.train_file] if args.train_file else []
        print(f"[fastlm] preparing {sources or args.dataset_name} -> {train_dir}", flush=True)
        prepare(sources, train_dir, tokenizer=tokenizer, train_tokenizer=args.train_tokenizer,
                vocab_size=args.vocab_size if args.train_tokenizer else None,
                **common, **({"split": "train"} if args.dataset_name else {}))
    if ready(eval_dir):
        return
    # The evaluation text uses the training store's tokenizer (the trained one, with --train_tokenizer).
    if train_dir.is_dir():
        tokenizer = str(TokenStore.open(train_dir).tokenizer_dir)
    if args.validation_file:
        prepare([args.validation_file], eval_dir, tokenizer=tokenizer, **common)
    elif args.dataset_name:
        try:
            prepare([], eval_dir, tokenizer=tokenizer, split="validation", **common)
        except (ValueError, KeyError):
            pass  # no validation split: --validation_split_percentage holds out train documents


def train_eval_documents(args, train_store, eval_store):
    """((train tokens, offsets) or None, (eval tokens, offsets) or None)."""
    train = (train_store.tokens, train_store.offsets) if train_store is not None else None
    if eval_store is not None:
        return train, (eval_store.tokens, eval_store.offsets)
    if train is None or args.validation_split_percentage == 0:
        return train, None
    try:
        return split_documents(*train, args.validation_split_percentage / 100)
    except ValueError as error:
        raise ConfigError(f"--validation_split_percentage {args.validation_split_percentage}: {error}") from None


def pack(args, tokens, offsets, tokenizer, *, stride=None):
    from fastlm import pack_blocks, pack_documents

    pad_id = padding_id(special_ids(tokenizer))
    if args.line_by_line:
        return _one_document_per_block(tokens, offsets, args.block_size, pad_id)
    if args.packing == "documents" and not stride:
        return pack_documents(tokens, offsets, args.block_size, pad_id=pad_id)
    separator = tokenizer.eos_token_id if args.separator == "eos" else None
    if args.separator == "eos" and separator is None:
        raise ConfigError("--separator eos: the tokenizer has no EOS token")
    # Strided evaluation keeps the final partial window so every token is scored, as HF's recipe does.
    remainder = "pad" if stride else "drop"
    return pack_blocks(tokens, offsets, args.block_size, separator=separator, stride=stride,
                       remainder=remainder, pad_id=pad_id)


def _one_document_per_block(tokens, offsets, block_size, pad_id):
    """run_mlm.py's --line_by_line: each non-empty document alone in a block, truncated to block_size and
    padded. Laid out as whole-document packing with one segment per block, so batches get the same
    position ids and per-document attention."""
    from fastlm.packing import PackedDocuments

    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    keep = lengths > 0
    kept = np.minimum(lengths[keep], block_size)
    return PackedDocuments(tokens=tokens, block_size=block_size,
                           block_offsets=np.arange(kept.shape[0] + 1, dtype=np.int64),
                           seg_starts=np.ascontiguousarray(offsets[:-1][keep]), seg_lengths=kept,
                           pad_id=pad_id, n_dropped=int(lengths[keep].sum() - kept.sum()))


def first_blocks(blocks, n):
    """The first n blocks, in packing order: run_clm.py's --max_train_samples / --max_eval_samples select
    them this way, before any shuffling."""
    from fastlm.packing import BlockIndex

    if n is None or n >= len(blocks):
        return blocks
    if isinstance(blocks, BlockIndex):
        return dataclasses.replace(blocks, starts=blocks.starts[:n], lengths=blocks.lengths[:n],
                                   context=blocks.context[:n])
    cut = int(blocks.block_offsets[n])
    return dataclasses.replace(blocks, block_offsets=blocks.block_offsets[:n + 1], seg_starts=blocks.seg_starts[:cut],
                               seg_lengths=blocks.seg_lengths[:cut])


def make_masker(args, tokenizer):
    from fastlm.masking import Masker

    if tokenizer.mask_token_id is None:
        raise ConfigError("--task mlm needs a tokenizer with a mask token")
    return Masker.from_tokenizer(tokenizer, mlm_probability=args.mlm_probability, seed=args.seed)
