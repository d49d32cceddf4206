"""The runner's data plan: training sources (one store, or several blended into a weighted mixture) and
evaluation sets; their stores (prepared from text on first use, once per node when the nodes do not
share the cache) and the checks between them and the model; their packing into blocks; and the order
batches take them in (epoch-seeded shuffling, disjoint shares per rank, MLM masks).

Batches are numpy; the DataLoader turns the arrays into tensors. Batches are keyed by global ids
(epoch, sample position, rank) so a run is reproducible whatever the DataLoader worker count, and a
resumed run can restart at any step without replaying the ones before it.
"""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastlm.config import ConfigError, Source, eval_sources, train_sources
from fastlm.tokenizer import padding_id, special_ids

# Per-document byte counts are summed in chunks of this many (bounded memory on any corpus).
_CHUNK_ITEMS = 1 << 24


# --- documents ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Documents:
    """Documents as packing takes them: tokens[offsets[i]:offsets[i + 1]] is document i (offsets may
    start above 0), with each document's UTF-8 byte count, or None when the store does not record it."""
    tokens: np.ndarray
    offsets: np.ndarray
    doc_bytes: np.ndarray = None

    @classmethod
    def of(cls, store):
        return cls(store.tokens, store.offsets, store.doc_bytes)

    @property
    def n_tokens(self):
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def n_bytes(self):
        if self.doc_bytes is None:
            return None
        return sum(int(self.doc_bytes[i:i + _CHUNK_ITEMS].sum()) for i in range(0, len(self.doc_bytes), _CHUNK_ITEMS))


def split_documents(documents, eval_fraction):
    """Hold out the last `eval_fraction` of the documents: (train Documents, eval Documents).

    Token arrays are views (a memmap stays a memmap, nothing is copied); offsets are rebased copies.
    """
    n_docs = len(documents.offsets) - 1
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
    return _doc_range(documents, 0, cut), _doc_range(documents, cut, n_docs)


def _doc_range(documents, first, last):
    tokens, offsets = documents.tokens, documents.offsets
    start, stop = int(offsets[first]), int(offsets[last])
    doc_bytes = None if documents.doc_bytes is None else documents.doc_bytes[first:last]
    return Documents(tokens[start:stop], np.asarray(offsets[first : last + 1], dtype=np.int64) - start, doc_bytes)


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
        from fastlm.blending import normalized_weights

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
        from fastlm.blending import blending_index

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


# --- sources: stores, prepared on first use -------------------------------------------------------

@dataclass(frozen=True)
class EvalSet:
    """An evaluation set: its packed blocks, and the tokens and UTF-8 bytes (None: not recorded) of the
    documents they hold, which turn a mean token loss into bits per byte."""
    name: str
    blocks: object
    n_tokens: int
    n_bytes: int = None


@dataclass(frozen=True)
class Stores:
    """The opened stores, [(Source, TokenStore)] for training and for evaluation (either may be empty:
    an evaluate-only run has no training store)."""
    train: list
    eval: list

    def load_tokenizer(self):
        """The tokenizer every store was made with (check_tokenizers compares them), checked against it."""
        try:
            return (self.train or self.eval)[0][1].load_tokenizer()
        except ValueError as error:
            raise ConfigError(str(error)) from None


# Bump when what a cached store holds for the same key changes (its readers or encoding).
_CACHE_FORMAT = 2


def cache_root(args):
    """Where prepared stores live: --cache_dir, else one user cache shared by every run (like datasets'
    cache), so a second run with a new --output_dir does not tokenize the same text again."""
    if args.cache_dir:
        return Path(args.cache_dir)
    base = os.environ.get("FASTLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm"
    return Path(base) / "stores"


def _file_identity(name, flag):
    try:
        st = Path(name).stat()
    except OSError as error:
        raise ConfigError(f"{flag} {name}: {error.strerror}") from None
    return [str(Path(name).resolve()), st.st_size, st.st_mtime_ns]


def _tokenizer_identity(spec):
    """What the tokenizer computes (its whole serialised pipeline), wherever it is loaded from: a run that
    evaluates a fine-tuned output_dir reuses the stores its training run made from the original model."""
    from fastlm.tokenizer import load_tokenizer

    try:
        backend = load_tokenizer(spec).backend_tokenizer.to_str()
    except (OSError, ValueError, TypeError):
        return str(spec)  # not loadable: prepare will say why
    return hashlib.sha256(backend.encode()).hexdigest()


def _cache_key(args):
    """Prepared stores are reused while the sources, the tokenizer and the preparation settings are
    unchanged."""
    files = [_file_identity(s.path, "--train_file") for s in train_sources(args.train_file or [], "--train_file")]
    files += [_file_identity(s.path, "--validation_file")
              for s in eval_sources(args.validation_file or [], "--validation_file")]
    tokenizer = None if args.train_tokenizer else args.tokenizer_name or args.model_name_or_path
    key = [_CACHE_FORMAT, files, args.dataset_name, args.dataset_config_name,
           _tokenizer_identity(tokenizer) if tokenizer else None, args.train_tokenizer,
           args.vocab_size if args.train_tokenizer else None, args.doc_boundary, _keep_blank(args),
           args.keep_linebreaks]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _keep_blank(args):
    # run_clm/run_mlm tokenize whitespace-only rows like any other; run_mlm --line_by_line drops them.
    return not (args.skip_blank_lines or args.line_by_line)


def _store_dirs(cache, kind, n):
    return [cache / kind] if n == 1 else [cache / f"{kind}-{i}" for i in range(n)]


def _open_given(source, flag):
    from fastlm.store import StoreError, TokenStore

    try:
        return TokenStore.open(source.path)
    except StoreError as error:
        raise ConfigError(f"{flag} {source.path}: {error}") from None


def open_or_prepare(args, rank):
    """The training and evaluation stores. Text sources are prepared into the cache first: once per
    filesystem that holds the cache (by rank 0 where every node shares it, else by one rank on each
    node; one run at a time per cache entry) while the other ranks wait; then every rank opens the
    stores it sees."""
    from fastlm.store import TokenStore

    if args.train_store or args.eval_store:
        return Stores(
            [(s, _open_given(s, "--train_store")) for s in train_sources(args.train_store or [], "--train_store")],
            [(s, _open_given(s, "--eval_store")) for s in eval_sources(args.eval_store or [], "--eval_store")])
    cache = cache_root(args) / _cache_key(args)
    train = (train_sources(args.train_file, "--train_file") if args.train_file
             else [Source("train", args.dataset_name)] if args.dataset_name else [])
    evals = (eval_sources(args.validation_file, "--validation_file") if args.validation_file
             else [Source("validation", args.dataset_name)] if args.dataset_name else [])  # its validation split, if any
    train_dirs, eval_dirs = _store_dirs(cache, "train", len(train)), _store_dirs(cache, "validation", len(evals))

    def prepare_locked():
        with _locked(cache):
            _prepare_into(args, train, evals, train_dirs, eval_dirs)

    once_per_filesystem(prepare_locked, cache, rank=rank, what="prepare the data")
    stores = Stores([(s, TokenStore.open(d)) for s, d in zip(train, train_dirs)],
                    [(s, TokenStore.open(d)) for s, d in zip(evals, eval_dirs) if d.is_dir()])
    _check_same_on_every_rank(stores)
    return stores


@contextlib.contextmanager
def _locked(cache):
    """One preparer per cache entry at a time, across runs: a second run waits, then finds the stores ready."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_same_on_every_rank(stores):
    """Nodes that prepared their own copies must hold the same stores: ids that differ between ranks
    would train one model on two numberings without any error."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    mine = [_content(store) for _, store in stores.train + stores.eval]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise ConfigError(f"rank {rank} prepared other stores than rank 0 (their nodes do not share the cache "
                              "and preparing gave different tokens); give --cache_dir a directory every node shares")


def rank0_then_others(work, *, rank, what):
    """Run work() on rank 0 while the other ranks wait; a failure there stops every rank, naming it."""
    import torch.distributed as dist

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
    import torch.distributed as dist

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
    import torch.distributed as dist

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


def _prepare_into(args, train, evals, train_dirs, eval_dirs):
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
    for i, (source, path) in enumerate(zip(train, train_dirs)):
        if i:  # every source in the first one's tokenizer (the trained one, with --train_tokenizer)
            tokenizer = str(TokenStore.open(train_dirs[0]).tokenizer_dir)
        if ready(path):
            continue
        files = [] if args.dataset_name else [source.path]
        print(f"[fastlm] preparing {files or args.dataset_name} -> {path}", flush=True)
        trains = args.train_tokenizer and i == 0
        prepare(files, path, tokenizer=None if trains else tokenizer, train_tokenizer=trains,
                vocab_size=args.vocab_size if trains else None,
                **common, **({"split": "train"} if args.dataset_name else {}))
    if train_dirs:  # the evaluation text in the training stores' tokenizer
        tokenizer = str(TokenStore.open(train_dirs[0]).tokenizer_dir)
    for source, path in zip(evals, eval_dirs):
        if ready(path):
            continue
        if args.validation_file:
            prepare([source.path], path, tokenizer=tokenizer, **common)
        elif args.dataset_name:
            try:
                prepare([], path, tokenizer=tokenizer, split="validation", **common)
            except (ValueError, KeyError):
                pass  # no validation split: --validation_split_percentage holds out train documents


def _content(store):
    return hashlib.sha256(json.dumps(store.meta.get("checksums"), sort_keys=True).encode()).hexdigest()


def plan(args, stores, tokenizer):
    """(training Mixture, or None when the run does not train; [EvalSet], empty when it does not
    evaluate): every store packed into blocks, --max_train_samples / --max_eval_samples blocks at most.
    Without an evaluation set, --validation_split_percentage holds out the last documents of each
    training source as a set of its own (named "validation" for a single source, else after the source)."""
    train = [(source, _content(store), Documents.of(store)) for source, store in stores.train]
    evals = [(source.name, Documents.of(store)) for source, store in stores.eval]
    percent = args.validation_split_percentage
    if not evals and percent:
        kept = []
        for source, content, docs in train:
            try:
                docs, held_out = split_documents(docs, percent / 100)
            except ValueError as error:
                where = f" (training source {source.name})" if len(train) > 1 else ""
                raise ConfigError(f"--validation_split_percentage {percent}{where}: {error}") from None
            kept.append((source, content, docs))
            evals.append((source.name if len(train) > 1 else "validation", held_out))
        train = kept
    mixture = None
    if args.do_train:
        mixture = Mixture([TrainSource(source.name, first_blocks(pack(args, docs.tokens, docs.offsets, tokenizer),
                                                                 args.max_train_samples), source.weight, content)
                           for source, content, docs in train])
    eval_sets = []
    for name, docs in evals if args.do_eval else ():
        blocks = first_blocks(pack(args, docs.tokens, docs.offsets, tokenizer, stride=args.eval_stride),
                              args.max_eval_samples)
        if len(blocks) == 0:
            raise ConfigError(f"the evaluation set {name} is shorter than one block of {args.block_size} tokens")
        eval_sets.append(EvalSet(name, blocks, docs.n_tokens, docs.n_bytes))
    if args.do_eval and not args.do_train and not eval_sets:
        raise ConfigError("--do_eval alone evaluates a model: give an evaluation set (--validation_file, "
                          "--eval_store, or a training source with --validation_split_percentage)")
    return mixture, eval_sets


# --- checks between the stores and the model ----------------------------------------------------------

def _described(stores):
    return [(f"training store {s.path}", store) for s, store in stores.train] + \
           [(f"evaluation store {s.path}", store) for s, store in stores.eval]


def check_tokenizers(stores):
    """Every store must hold ids of the same tokenizer (the vocabulary fingerprint each store records):
    ids of another tokenizer would train or score the wrong tokens without any error."""
    described = _described(stores)
    first, reference = described[0]
    want = reference.meta.get("tokenizer_fingerprint")
    for what, store in described[1:]:
        got = store.meta.get("tokenizer_fingerprint")
        if want and got and got != want:
            raise ConfigError(
                f"the {what} was made with another tokenizer than the {first} (vocabulary fingerprints "
                f"{got[:12]} and {want[:12]}): its ids stand for other tokens. Prepare it with that tokenizer "
                f"(fastlm prepare ... --tokenizer {reference.tokenizer_dir})")


def check_token_ids(stores, vocab_size):
    """Every id in every store must be below the model's vocabulary (its embedding rows): a larger one
    would fail deep inside torch at whichever step first draws it."""
    for what, store in _described(stores):
        top = store.max_token_id  # recorded in meta.json; one pass over the tokens for older stores
        if top is not None and top >= vocab_size:
            raise ConfigError(
                f"the {what} holds token id {top}, but the model's vocabulary has {vocab_size} ids (its "
                "embedding matrix): prepare the store with the model's tokenizer, or train a model whose "
                "vocabulary covers it")


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


def describe_sources(sources):
    """A mixture's sources (Mixture.identity()["sources"]) as the command line weighs them, with blocks."""
    return " ".join(f"{s['name']}:{s['weight']:.4g} ({s['blocks']} blocks)" for s in sources) or "(not recorded)"
