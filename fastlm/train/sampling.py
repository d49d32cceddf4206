"""The order samples are trained in: each source's epoch-seeded shuffle, a mixture's blend of sources, each
rank's micro batches of an optimizer step (TrainBatches) and the evaluation batches.

Batches are numpy; the DataLoader turns the arrays into tensors. Batches are keyed by global ids
(epoch, sample position, rank) so a run is reproducible whatever the DataLoader worker count, and a
resumed run can restart at any step without replaying the ones before it.
"""
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from fastlm.blending import blending_index, normalized_weights
from fastlm.train.errors import ConfigError


def epoch_order(n_samples, *, seed, epoch, source=0):
    """The order of a source's epoch: its sample s of `epoch` is block epoch_order(...)[s].

    A function of (seed, epoch, source) only, so the sample at a global position is the same whatever
    the micro batch, accumulation or rank count (MosaicML Streaming's "elastic determinism"). Sources
    of a mixture shuffle independently; source 0 keeps the single-corpus stream, so a one-source run's
    order (and its checkpoints) is the same as before mixtures existed.
    """
    key = [epoch, seed] if source == 0 else [epoch, seed, source]
    return np.random.Generator(np.random.PCG64(key)).permutation(n_samples)


@dataclass(frozen=True)
class TrainSource:
    """One training source: its packed blocks, its weight in the mixture (None: in proportion to its
    blocks) and the sha256 of its store's checksums (what a checkpoint compares)."""
    name: str
    blocks: object
    weight: float = None
    content: str = ""


class Mixture:
    """Training sources blended into one stream of samples (Megatron's BlendedDataset order).

    Global sample position g goes to source blend[g] as that source's sample k (fastlm.blending), which
    is block epoch_order(n, seed, e, source)[k % n] of its epoch e = k // n: each source is shuffled on
    its own, and one that runs out starts its next epoch while the others go on. An epoch of the mixture
    is as many samples as the sources hold together (sum of their blocks); position p of mixture epoch E
    is g = E * len(mixture) + p. So the sample at a position depends on (seed, weights, position) only.
    The blend is computed in chunks of CHUNK positions from the counts at each chunk's start, which are
    kept, so a resumed run computes the blend up to its position once and nothing is held per sample.
    """

    CHUNK = 1 << 16

    def __init__(self, sources):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.sources = list(sources)
        self.sizes = np.array([len(s.blocks) for s in self.sources], dtype=np.int64)
        if np.any(self.sizes == 0):
            empty = [s.name for s in self.sources if len(s.blocks) == 0]
            raise ConfigError(f"training source {empty[0]} is shorter than one block")
        given = [s.weight for s in self.sources]
        self.weights = normalized_weights(self.sizes if given[0] is None else given)
        # Global block ids: the sources' blocks numbered one after another.
        self.first_block = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self._chunk_counts = [np.zeros(len(self.sources), dtype=np.int64)]
        self._chunk = (-1, None, None)
        self._orders = {}

    @classmethod
    def single(cls, blocks, name="train"):
        return cls([TrainSource(name, blocks, 1.0)])

    def __len__(self):
        return int(self.sizes.sum())

    @property
    def names(self):
        return [s.name for s in self.sources]

    def identity(self):
        """What a checkpoint's data position counts in: the sources' content, weights and blocks."""
        if len(self.sources) == 1:
            content = self.sources[0].content
        else:
            parts = [[s.content, float(w)] for s, w in zip(self.sources, self.weights)]
            content = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        return {"train_data": content, "train_blocks": len(self),
                "sources": [{"name": s.name, "weight": float(w), "blocks": int(n)}
                            for s, w, n in zip(self.sources, self.weights, self.sizes)]}

    def locate(self, epoch, positions, *, seed):
        """(source, block within the source, sample number within the source) of an epoch's positions."""
        positions = np.asarray(positions, dtype=np.int64)
        g = epoch * len(self) + positions
        if len(self.sources) == 1:
            source, sample = np.zeros(len(g), dtype=np.int16), g
        else:
            source, sample = self._blend(g)
        n = self.sizes[source]
        source_epoch, within = np.divmod(sample, n)
        block = np.empty(len(g), dtype=np.int64)
        for s, e in sorted(set(zip(source.tolist(), source_epoch.tolist()))):
            rows = (source == s) & (source_epoch == e)
            block[rows] = self._order(s, e, seed)[within[rows]]
        return source, block, sample

    def global_blocks(self, epoch, positions, *, seed):
        """Block ids across all sources (source s's block b is first_block[s] + b)."""
        source, block, _ = self.locate(epoch, positions, seed=seed)
        return self.first_block[source] + block

    def gather(self, epoch, positions, *, seed):
        """(batch, positions of its rows): rows grouped by source and in block order within each, so the
        memmaps are read forward; mixtures add a "source" row (the source's index)."""
        positions = np.asarray(positions, dtype=np.int64)
        source, block, _ = self.locate(epoch, positions, seed=seed)
        rows = np.lexsort((block, source))
        source, block, positions = source[rows], block[rows], positions[rows]
        parts = [self.sources[s].blocks.gather(block[source == s]) for s in np.unique(source)]
        batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(self.sources) > 1:
            batch["source"] = source.astype(np.int64)
        return batch, positions

    def new_source_epochs(self, epoch, positions, *, seed):
        """[(source name, its epoch)] for each source whose next epoch starts among these positions."""
        if len(self.sources) == 1:
            return []
        source, _, sample = self.locate(epoch, positions, seed=seed)
        starts = (sample % self.sizes[source] == 0) & (sample > 0)
        return sorted({(self.sources[s].name, int(k // self.sizes[s])) for s, k in zip(source[starts], sample[starts])})

    def _order(self, source, epoch, seed):
        key = (source, epoch, seed)
        if key not in self._orders:
            # Keep a source's current and previous epoch only: a step may straddle the two.
            for old in [k for k in self._orders if k[0] == source and k[1] < epoch - 1]:
                del self._orders[old]
            self._orders[key] = epoch_order(int(self.sizes[source]), seed=seed, epoch=epoch, source=source)
        return self._orders[key]

    def _blend(self, g):
        source = np.empty(len(g), dtype=np.int16)
        sample = np.empty(len(g), dtype=np.int64)
        chunk_of = g // self.CHUNK
        for c in np.unique(chunk_of):
            while len(self._chunk_counts) <= c:  # the counts at each chunk start, computed once in order
                k = len(self._chunk_counts) - 1
                _, _, after = blending_index(self.weights, self.CHUNK, start=k * self.CHUNK, counts=self._chunk_counts[k])
                self._chunk_counts.append(after)
            if self._chunk[0] != c:
                chunk_source, chunk_sample, _ = blending_index(self.weights, self.CHUNK, start=int(c) * self.CHUNK,
                                                               counts=self._chunk_counts[c])
                self._chunk = (c, chunk_source, chunk_sample)
            rows = chunk_of == c
            source[rows] = self._chunk[1][g[rows] - c * self.CHUNK]
            sample[rows] = self._chunk[2][g[rows] - c * self.CHUNK]
        return source, sample


class TrainBatches:
    """Map-style dataset: item j is this rank's j-th micro batch of `epoch`, from sample position `start`.

    `data` is a Mixture (or one source's packed blocks). An optimizer step takes the next
    global_batch = micro_batch x accumulation x world_size sample positions of the epoch; within the
    step, micro batch m of rank r takes the micro_batch positions starting at
    (m * world_size + r) * micro_batch. So a step trains on the same samples whatever the split of its
    global batch, ranks see disjoint samples, and a checkpoint's data position is one number: the epoch's
    sample position at a step boundary. An epoch ends when fewer than a global batch of positions remain
    (the tail is dropped, like DistributedSampler(drop_last=True)), so gradient accumulation never
    straddles two epochs. MLM masks are keyed by (seed, epoch, sample position): a sample gets the same
    mask in any layout.
    """

    def __init__(self, data, *, micro_batch, accumulation, rank, world_size, epoch, seed, start=0,
                 masker=None, position_offset=0):
        self.data = data if isinstance(data, Mixture) else Mixture.single(data)
        self.micro_batch, self.accumulation, self.position_offset = micro_batch, accumulation, position_offset
        self.rank, self.world_size, self.epoch, self.seed, self.start = rank, world_size, epoch, seed, start
        self.masker = masker
        self.global_batch = micro_batch * accumulation * world_size
        self.steps = max(0, (len(self.data) - start) // self.global_batch)

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
        """The blocks of micro batch j (global ids over the mixture's sources)."""
        return self.data.global_blocks(self.epoch, self.positions(j), seed=self.seed)

    def new_source_epochs(self, j):
        """Sources that start their next epoch in the step that micro batch j ends."""
        end = self.end_position(j)
        return self.data.new_source_epochs(self.epoch, np.arange(end - self.global_batch, end), seed=self.seed)

    def __getitem__(self, j):
        if not 0 <= j < len(self):
            raise IndexError(j)
        batch, positions = self.data.gather(self.epoch, self.positions(j), seed=self.seed)
        if self.masker is not None:  # each row's mask follows its own position
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


def describe_sources(sources):
    """A mixture's sources (Mixture.identity()["sources"]) as the command line weighs them, with blocks."""
    return " ".join(f"{s['name']}:{s['weight']:.4g} ({s['blocks']} blocks)" for s in sources) or "(not recorded)"
