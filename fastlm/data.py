"""Batches over packed blocks for the runner: epoch-seeded shuffling, disjoint shares per rank, MLM masks.

Everything here is numpy; the DataLoader turns the arrays into tensors. Batches are keyed by global ids
(epoch, micro-batch number, rank) so a run is reproducible whatever the DataLoader worker count, and a
resumed run can restart at any micro-batch without replaying the ones before it.
"""
import numpy as np

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


class TrainBatches:
    """Map-style dataset: item j is this rank's j-th micro-batch of `epoch`.

    Blocks are shuffled by a permutation seeded by (epoch, seed); global micro-batch g = j * world + rank
    takes permutation[g * micro : (g + 1) * micro], so ranks see disjoint blocks. Each epoch holds a whole
    number of optimizer steps per rank (the tail that would not fill one is dropped, like
    DistributedSampler(drop_last=True)), so gradient accumulation never straddles two epochs.
    """

    def __init__(self, blocks, *, micro_batch, accumulation, rank, world_size, epoch, seed, masker=None,
                 position_offset=0):
        self.blocks, self.micro_batch, self.position_offset = blocks, micro_batch, position_offset
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.masker = masker
        per_rank = len(blocks) // (micro_batch * world_size)
        self.n_batches = per_rank - per_rank % accumulation
        self.order = np.random.Generator(np.random.PCG64([epoch, seed])).permutation(len(blocks))

    def __len__(self):
        return self.n_batches

    def global_batch(self, j):
        return j * self.world_size + self.rank

    def indices(self, j):
        g = self.global_batch(j)
        return self.order[g * self.micro_batch : (g + 1) * self.micro_batch]

    def __getitem__(self, j):
        if not 0 <= j < self.n_batches:
            raise IndexError(j)
        batch = self.blocks.gather(np.sort(self.indices(j)))
        if self.masker is not None:
            batch["input_ids"], batch["labels"] = self.masker(
                batch["input_ids"], batch["attention_mask"], epoch=self.epoch, batch_index=self.global_batch(j)
            )
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
