"""The run's token stores: the ones given (--train_store/--eval_store), or text (--train_file/--validation_file/
--dataset_name) prepared into a cache on first use, once per filesystem that holds the cache; and the checks
between the stores and the model.
"""
import contextlib
import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fastlm import cache as cache_lib
from fastlm.megatron import MegatronStore
from fastlm.packing import check_token_dtype
from fastlm.prepare import prepare
from fastlm.store import StoreError, TokenStore
from fastlm.tokenizer import load_tokenizer
from fastlm.train import dist
from fastlm.train.errors import ConfigError
from fastlm.train.sources import Source


@dataclass(frozen=True)
class Stores:
    """The opened stores, [(Source, TokenStore)] for training and for evaluation (either may be empty:
    an evaluate-only run has no training store)."""
    train: list
    eval: list

    def load_tokenizer(self, given=None):
        """The tokenizer every store was made with (check_tokenizers compares them), checked against it; for
        stores that record none (a Megatron dataset), `given` (--tokenizer_name, else --model_name_or_path)."""
        stores = [store for _, store in self.train + self.eval]
        own = next((store for store in stores if not isinstance(store, MegatronStore)), None)
        try:
            if own is not None:
                return own.load_tokenizer()
            if given is None:
                return stores[0].load_tokenizer()  # says which flag names the tokenizer
            return load_tokenizer(given)
        except (OSError, ValueError) as error:
            raise ConfigError(" ".join(str(error).split())) from None


# Bump when what a cached store holds for the same key changes (its readers or encoding).
_CACHE_FORMAT = 2


def _file_identity(name, flag):
    try:
        st = Path(name).stat()
    except OSError as error:
        raise ConfigError(f"{flag} {name}: {error.strerror}") from None
    return [str(Path(name).resolve()), st.st_size, st.st_mtime_ns]


def _tokenizer_identity(spec):
    """What the tokenizer computes (its whole serialised pipeline), wherever it is loaded from: a run that
    evaluates a fine-tuned output_dir reuses the stores its training run made from the original model."""
    try:
        backend = load_tokenizer(spec).backend_tokenizer.to_str()
    except (OSError, ValueError, TypeError):
        return str(spec)  # not loadable: prepare will say why
    return hashlib.sha256(backend.encode()).hexdigest()


def _cache_key(data):
    """Prepared stores are reused while the sources, the tokenizer and the preparation settings are
    unchanged."""
    files = [_file_identity(s.path, "--train_file") for s in data.train_files]
    files += [_file_identity(s.path, "--validation_file") for s in data.validation_files]
    key = [_CACHE_FORMAT, files, data.dataset_name, data.dataset_config_name,
           _tokenizer_identity(data.tokenizer) if data.tokenizer else None, data.train_tokenizer,
           data.vocab_size if data.train_tokenizer else None, data.doc_boundary, data.keep_blank,
           data.keep_linebreaks]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _store_dirs(cache, kind, n):
    return [cache / kind] if n == 1 else [cache / f"{kind}-{i}" for i in range(n)]


def _open_given(source, flag):
    try:
        store = TokenStore.open(source.path)
        # A Megatron dataset may hold ids in a dtype the packing kernels do not read: said before anything starts.
        check_token_dtype(store.tokens.dtype)
    except StoreError as error:
        raise ConfigError(f"{flag} {source.path}: {error}") from None
    except TypeError:
        raise ConfigError(f"{flag} {source.path}: its {store.tokens.dtype} token ids are not supported (fastlm's packing "
                          "kernels read uint16, uint32, int32 or int64 ids and never copy a dataset to convert it); "
                          "write the dataset again with uint16 ids (int32 for 65,536 ids or more), e.g. with "
                          "megatron-core's IndexedDatasetBuilder(..., dtype=numpy.uint16)") from None
    return store


def open_or_prepare(data, rank, held):
    """The training and evaluation stores. Text sources are prepared into the cache first (one user cache
    shared by every run, like datasets': fastlm.cache): once per filesystem that holds the cache (by rank 0
    where every node shares it, else by one rank on each node; one run at a time per cache entry) while the
    other ranks wait; then every rank opens the stores it sees. The cache entry is marked in use (`held`, an
    ExitStack the run keeps open) so `fastlm cache clean` leaves it alone."""
    if data.given_stores:
        return Stores([(s, _open_given(s, "--train_store")) for s in data.train_stores],
                      [(s, _open_given(s, "--eval_store")) for s in data.eval_stores])
    cache = cache_lib.stores_root(data.cache_dir) / _cache_key(data)
    train = list(data.train_files) or ([Source("train", data.dataset_name)] if data.dataset_name else [])
    # the dataset's validation split, if any
    evals = list(data.validation_files) or ([Source("validation", data.dataset_name)] if data.dataset_name else [])
    train_dirs, eval_dirs = _store_dirs(cache, "train", len(train)), _store_dirs(cache, "validation", len(evals))
    held.enter_context(cache_lib.using(cache))

    def prepare_locked():
        with _locked(cache):
            if _prepare_into(data, train, evals, train_dirs, eval_dirs):
                cache_lib.record(cache, sources=_cache_sources(data, train + evals, train_dirs + eval_dirs),
                                 tokenizer=_tokenizer_description(data))

    dist.once_per_filesystem(prepare_locked, cache, rank=rank, what="prepare the data")
    stores = Stores([(s, TokenStore.open(d)) for s, d in zip(train, train_dirs)],
                    [(s, TokenStore.open(d)) for s, d in zip(evals, eval_dirs) if d.is_dir()])
    _check_same_on_every_rank(stores)
    return stores


@contextlib.contextmanager
def _locked(cache):
    """One preparer per cache entry at a time, across runs: a second run waits, then finds the stores ready."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_same_on_every_rank(stores):
    """Nodes that prepared their own copies must hold the same stores: ids that differ between ranks
    would train one model on two numberings without any error."""
    mine = [content_id(store) for _, store in stores.train + stores.eval]
    everyone = dist.gather(mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise ConfigError(f"rank {rank} prepared other stores than rank 0 (their nodes do not share the cache "
                              "and preparing gave different tokens); give --cache_dir a directory every node shares")


def _cache_sources(data, sources, dirs):
    """What each store of a cache entry was prepared from, for `fastlm cache list`."""
    if data.dataset_name:
        return {d.name: {"dataset": data.dataset_name, "config": data.dataset_config_name, "split": d.name}
                for d in dirs if d.is_dir()}
    return {d.name: s.path for s, d in zip(sources, dirs)}


def _tokenizer_description(data):
    if data.train_tokenizer:
        return f"byte-level BPE trained on the sources (vocab_size={data.vocab_size})"
    return str(data.tokenizer)


def _prepare_into(data, train, evals, train_dirs, eval_dirs):
    """Prepare every store of the entry that is not ready; whether any was prepared."""
    prepared = False

    def ready(path):
        if data.overwrite_cache:
            return False
        try:
            TokenStore.open(path)
            return True
        except ValueError:
            return False

    # Special tokens as the tutorial's tokenizer(...) call adds them (<s> ... </s> per RoBERTa document).
    # overwrite: only a store that failed to open (say a run killed while preparing) or --overwrite_cache.
    common = dict(doc_boundary=data.doc_boundary, add_special_tokens=True, progress=True, overwrite=True,
                  keep_blank=data.keep_blank, keep_linebreaks=data.keep_linebreaks,
                  num_proc=data.preprocessing_num_workers or 1)
    if data.dataset_name:
        common.update(dataset_name=data.dataset_name, dataset_config=data.dataset_config_name)
    tokenizer = data.tokenizer
    for i, (source, path) in enumerate(zip(train, train_dirs)):
        if i:  # every source in the first one's tokenizer (the trained one, with --train_tokenizer)
            tokenizer = str(TokenStore.open(train_dirs[0]).tokenizer_dir)
        if ready(path):
            continue
        files = [] if data.dataset_name else [source.path]
        print(f"[fastlm] preparing {files or data.dataset_name} -> {path} (the data cache: `fastlm cache list` "
              "shows it, `fastlm cache clean` removes it)", flush=True)
        trains = data.train_tokenizer and i == 0
        _prepare(f"--dataset_name {data.dataset_name}" if data.dataset_name else f"--train_file {source.path}", files, path,
                 tokenizer=None if trains else tokenizer, train_tokenizer=trains,
                 vocab_size=data.vocab_size if trains else None,
                 **common, **({"split": "train"} if data.dataset_name else {}))
        prepared = True
    if train_dirs:  # the evaluation text in the training stores' tokenizer
        tokenizer = str(TokenStore.open(train_dirs[0]).tokenizer_dir)
    for source, path in zip(evals, eval_dirs):
        if ready(path):
            continue
        if data.validation_files:
            _prepare(f"--validation_file {source.path}", [source.path], path, tokenizer=tokenizer, **common)
            prepared = True
        elif data.dataset_name:
            try:
                prepare([], path, tokenizer=tokenizer, split="validation", **common)
                prepared = True
            except (ValueError, KeyError):
                pass  # no validation split: --validation_split_percentage holds out train documents
    return prepared


def _prepare(source, files, path, **settings):
    """fastlm.prepare, its refusals (an empty file, invalid UTF-8, a missing column) as one ConfigError line
    naming the flag and source."""
    try:
        prepare(files, path, **settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {' '.join(str(error).split())}") from None


def content_id(store):
    """What a checkpoint compares to know the data is the same: the store's checksums."""
    return hashlib.sha256(json.dumps(store.meta.get("checksums"), sort_keys=True).encode()).hexdigest()


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
