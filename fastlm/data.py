"""The runner's data plan: training and evaluation sources (stores, prepared from text on first use),
their packing into blocks, and the order batches take them in (epoch-seeded shuffling, disjoint shares
per rank, MLM masks).

Batches are numpy; the DataLoader turns the arrays into tensors. Batches are keyed by global ids
(epoch, micro-batch number, rank) so a run is reproducible whatever the DataLoader worker count, and a
resumed run can restart at any micro-batch without replaying the ones before it.
"""
import hashlib
import json
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

def _cache_key(args):
    """Prepared stores are reused while the sources and preparation settings are unchanged."""
    sources = []
    for name in (args.train_file, args.validation_file):
        if name:
            st = Path(name).stat()
            sources.append([str(Path(name).resolve()), st.st_size, st.st_mtime_ns])
    tokenizer = args.tokenizer_name or args.model_name_or_path
    key = [sources, args.dataset_name, args.dataset_config_name, tokenizer, args.train_tokenizer,
           args.vocab_size if args.train_tokenizer else None, args.doc_boundary]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def open_or_prepare(args, rank):
    """(train store, eval store or None). With text sources, rank 0 prepares them into the cache while
    the other ranks wait at a barrier, then everyone opens the same stores."""
    from fastlm.store import TokenStore

    if args.train_store:
        return TokenStore.open(args.train_store), (TokenStore.open(args.eval_store) if args.eval_store else None)
    cache = Path(args.cache_dir or Path(args.output_dir) / "data") / _cache_key(args)
    train_dir, eval_dir = cache / "train", cache / "validation"
    rank0_then_others(lambda: _prepare_into(args, train_dir, eval_dir), rank=rank, what="prepare the data")
    return TokenStore.open(train_dir), (TokenStore.open(eval_dir) if eval_dir.is_dir() else None)


def rank0_then_others(work, *, rank, what):
    """Run work() on rank 0 while the other ranks wait; a failure there stops every rank, naming it."""
    import torch.distributed as dist

    failure = [None]
    if rank == 0:
        try:
            work()
        except Exception as error:
            failure = [error if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"]
            if dist.get_world_size() > 1:
                dist.broadcast_object_list(failure, src=0)
            raise
    if dist.get_world_size() > 1:  # the others wait here: a barrier that also tells them when rank 0 failed
        dist.broadcast_object_list(failure, src=0)
    if isinstance(failure[0], ConfigError):
        raise failure[0]  # a configuration error reads the same on every rank: one line, exit status 2
    if failure[0]:
        raise RuntimeError(f"rank 0 could not {what}: {failure[0]}")


def _prepare_into(args, train_dir, eval_dir):
    from fastlm.prepare import prepare
    from fastlm.store import TokenStore

    def ready(path):
        try:
            TokenStore.open(path)
            return True
        except ValueError:
            return False

    # Special tokens as the tutorial's tokenizer(...) call adds them (<s> ... </s> per RoBERTa document).
    # overwrite: only a store that failed to open is rebuilt (say a run killed while preparing).
    common = dict(doc_boundary=args.doc_boundary, add_special_tokens=True, progress=True, overwrite=True)
    if args.dataset_name:
        common.update(dataset_name=args.dataset_name, dataset_config=args.dataset_config_name)
    if not ready(train_dir):
        tokenizer = None if args.train_tokenizer else (args.tokenizer_name or args.model_name_or_path)
        sources = [args.train_file] if args.train_file else []
        print(f"[fastlm] preparing {sources or args.dataset_name} -> {train_dir}", flush=True)
        prepare(sources, train_dir, tokenizer=tokenizer, train_tokenizer=args.train_tokenizer,
                vocab_size=args.vocab_size if args.train_tokenizer else None,
                **common, **({"split": "train"} if args.dataset_name else {}))
    if ready(eval_dir):
        return
    # The evaluation text uses the training store's tokenizer (the trained one, with --train_tokenizer).
    tokenizer = str(TokenStore.open(train_dir).tokenizer_dir)
    if args.validation_file:
        prepare([args.validation_file], eval_dir, tokenizer=tokenizer, **common)
    elif args.dataset_name:
        try:
            prepare([], eval_dir, tokenizer=tokenizer, split="validation", **common)
        except (ValueError, KeyError):
            pass  # no validation split: --validation_split_percentage holds out train documents


def train_eval_documents(args, train_store, eval_store):
    """((train tokens, offsets), (eval tokens, offsets) or None)."""
    train = (train_store.tokens, train_store.offsets)
    if eval_store is not None:
        return train, (eval_store.tokens, eval_store.offsets)
    if args.validation_split_percentage == 0:
        return train, None
    try:
        return split_documents(*train, args.validation_split_percentage / 100)
    except ValueError as error:
        raise ConfigError(f"--validation_split_percentage {args.validation_split_percentage}: {error}") from None


def pack(args, tokens, offsets, tokenizer, *, stride=None):
    from fastlm import pack_blocks, pack_documents

    pad_id = padding_id(special_ids(tokenizer))
    if args.packing == "documents" and not stride:
        return pack_documents(tokens, offsets, args.block_size, pad_id=pad_id)
    separator = tokenizer.eos_token_id if args.separator == "eos" else None
    if args.separator == "eos" and separator is None:
        raise ConfigError("--separator eos: the tokenizer has no EOS token")
    # Strided evaluation keeps the final partial window so every token is scored, as HF's recipe does.
    remainder = "pad" if stride else "drop"
    return pack_blocks(tokens, offsets, args.block_size, separator=separator, stride=stride,
                       remainder=remainder, pad_id=pad_id)


def make_masker(args, tokenizer):
    from fastlm.masking import Masker

    if tokenizer.mask_token_id is None:
        raise ConfigError("--task mlm needs a tokenizer with a mask token")
    return Masker.from_tokenizer(tokenizer, mlm_probability=args.mlm_probability, seed=args.seed)
