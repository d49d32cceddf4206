"""Memory-mapped token store: a directory the kernels and the runner read without copies.

Layout of a store directory::

    tokens.bin    every document's token ids back to back (uint16 when the vocabulary fits
                  in 65536 ids, else uint32), native little-endian
    offsets.bin   int64, n_docs + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]
    meta.json     format version, dtype, vocabulary size, special ids, tokenizer name and
                  vocabulary fingerprint, counts, source, sha256 of both files, the arguments
    tokenizer/    the tokenizer in save_pretrained form (written by fastlm.prepare)

Writers build the whole directory under a temporary name beside the destination and rename it at
the end, so an interrupted run never leaves anything that opens as a store. Only numpy is imported
here: readers (the runner, data loader workers) stay light.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "fastlm-token-store"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.bin"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPECIAL_NAMES = ("eos", "bos", "pad", "mask", "cls", "sep", "unk")

# Checks and copies walk the memmaps in chunks of this many items, so no pass over a store ever
# materialises more than ~128 MB however large the corpus is.
_CHUNK_ITEMS = 1 << 24
# Offsets are buffered in RAM and flushed in blocks of this many entries (8 MB): bounded memory.
_OFFSET_BUFFER_ITEMS = 1 << 20


class StoreError(ValueError):
    """A directory that is not a valid token store: missing, foreign, truncated or corrupt."""


def dtype_for_vocab(vocab_size):
    """The smallest unsigned dtype that holds every id below vocab_size (uint16 or uint32)."""
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenStore:
    """A read-only view of a token store directory.

    ``store.tokens`` and ``store.offsets`` are read-only ``np.memmap``s; ``store[i]`` /
    ``store.doc(i)`` is document i (a memmap view, no copy); ``store[a:b]`` is a store over
    documents a..b-1 sharing the same token memmap; ``store.iter_batches(n)`` walks the store in
    views of n documents.
    """

    def __init__(self, path, tokens, offsets, meta):
        # Use TokenStore.open(path); this constructor trusts its arguments.
        self.path = Path(path)
        self.tokens = tokens
        self.offsets = offsets
        self.meta = meta

    @classmethod
    def open(cls, path, *, verify=False):
        """Map a store read-only after checking it; verify=True also checks both sha256 sums."""
        path = Path(path)
        meta_path = path / META_FILE
        if not path.is_dir():
            raise StoreError(f"{path} is not a token store: no such directory")
        if not meta_path.is_file():
            raise StoreError(f"{path} is not a token store: {META_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise StoreError(f"{meta_path} is corrupt: not valid JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{path} is not a fastlm token store ({META_FILE} has no format {FORMAT!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {meta.get('format_version')!r}; this fastlm reads "
                f"version {FORMAT_VERSION}: re-run fastlm prepare or upgrade fastlm"
            )
        try:
            dtype = np.dtype(meta["dtype"])
            n_docs = int(meta["n_docs"])
            n_tokens = int(meta["n_tokens"])
            vocab_size = int(meta["vocab_size"])
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{meta_path} is corrupt: bad or missing field ({error})") from None
        if dtype not in (np.uint16, np.uint32):
            raise StoreError(f"{meta_path} is corrupt: token dtype {dtype} is not uint16 or uint32")
        if n_docs < 0 or n_tokens < 0:
            raise StoreError(f"{meta_path} is corrupt: negative n_docs or n_tokens")

        tokens = cls._map(path / TOKENS_FILE, dtype, n_tokens)
        offsets = cls._map(path / OFFSETS_FILE, np.dtype(np.int64), n_docs + 1)
        store = cls(path, tokens, offsets, meta)
        store._check_offsets()
        if verify:
            store.verify()
        return store

    @staticmethod
    def _map(file, dtype, count):
        if not file.is_file():
            raise StoreError(f"{file} is missing: the store is incomplete")
        size = file.stat().st_size
        if size != count * dtype.itemsize:
            raise StoreError(
                f"{file} has {size} bytes but meta.json promises {count} {dtype} items "
                f"({count * dtype.itemsize} bytes): the store is truncated or corrupt"
            )
        if count == 0:
            # np.memmap refuses empty files; an empty read-only array behaves the same.
            empty = np.empty(0, dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))

    def _check_offsets(self):
        offsets = self.offsets
        if offsets[0] != 0 or offsets[-1] != self.tokens.shape[0]:
            raise StoreError(
                f"{self.path / OFFSETS_FILE} is corrupt: offsets run from {offsets[0]} to {offsets[-1]}, "
                f"expected 0 to n_tokens={self.tokens.shape[0]}"
            )
        # Overlapping chunks by one entry so every adjacent pair is compared exactly once.
        for start in range(0, offsets.shape[0] - 1, _CHUNK_ITEMS):
            chunk = offsets[start : start + _CHUNK_ITEMS + 1]
            if np.any(chunk[1:] < chunk[:-1]):
                bad = start + int(np.argmax(chunk[1:] < chunk[:-1]))
                raise StoreError(
                    f"{self.path / OFFSETS_FILE} is corrupt: offsets decrease at document {bad}"
                )

    def verify(self):
        """Recompute the sha256 of both data files and compare with meta.json; raises StoreError."""
        expected = self.meta.get("checksums", {})
        for name in (TOKENS_FILE, OFFSETS_FILE):
            want = expected.get(name)
            if want is None:
                raise StoreError(f"{self.path / META_FILE} has no checksum for {name}")
            got = _sha256_file(self.path / name)
            if got != want:
                raise StoreError(f"{self.path / name} is corrupt: sha256 {got} != {want} in meta.json")
        return True

    @property
    def tokenizer_dir(self):
        """<store>/tokenizer, in save_pretrained form: AutoTokenizer.from_pretrained(it) works offline."""
        return self.path / TOKENIZER_DIR

    @property
    def vocab_size(self):
        return int(self.meta["vocab_size"])

    @property
    def special_ids(self):
        return dict(self.meta.get("special_ids", {}))

    @property
    def pad_id(self):
        """The id to pad blocks with (fastlm.tokenizer.padding_id of the store's special ids)."""
        from fastlm.tokenizer import padding_id

        return padding_id(self.special_ids)

    @property
    def n_tokens(self):
        return int(self.tokens.shape[0])

    def __len__(self):
        return int(self.offsets.shape[0]) - 1

    def doc(self, i):
        """Token ids of document i, a read-only view into the memmap (negative i counts from the end)."""
        n = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"document index must be an integer, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a store of {n} documents")
        i = int(i) % n
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("store slices must be contiguous (step 1)")
            stop = max(start, stop)
            first = self.offsets[start]
            # Token view shares the memmap; only the (small) offsets slice is rebased into a copy.
            tokens = self.tokens[first : self.offsets[stop]]
            offsets = np.asarray(self.offsets[start : stop + 1]) - first
            offsets.flags.writeable = False
            view = TokenStore(self.path, tokens, offsets, self.meta)
            return view
        return self.doc(key)

    def __iter__(self):
        for i in range(len(self)):
            yield self.doc(i)

    def iter_batches(self, docs_per_batch):
        """Yield consecutive sub-stores of docs_per_batch documents (the last may be shorter)."""
        if not isinstance(docs_per_batch, (int, np.integer)) or docs_per_batch < 1:
            raise ValueError(f"docs_per_batch must be a positive integer, got {docs_per_batch!r}")
        for start in range(0, len(self), docs_per_batch):
            yield self[start : start + docs_per_batch]

    def __repr__(self):
        return (
            f"TokenStore({str(self.path)!r}, n_docs={len(self)}, n_tokens={self.n_tokens}, "
            f"dtype={self.tokens.dtype}, vocab_size={self.meta.get('vocab_size')})"
        )


class StoreWriter:
    """Streams documents into a new store; use as a context manager.

    Everything goes to a temporary directory beside ``output`` (``writer.path``, where callers may
    also save the tokenizer); ``close()`` writes meta.json and renames it into place. Leaving the
    ``with`` block by an exception deletes the temporary directory, and a killed process leaves
    only a ``.<name>.tmp-*`` directory that never opens as a store.
    """

    def __init__(self, output, *, vocab_size, overwrite=False):
        self.output = Path(output)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = int(vocab_size)
        self.overwrite = overwrite
        _check_destination(self.output, overwrite)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        # mkdtemp makes a private 0700 directory; a finished store should be as readable as any output.
        os.chmod(self.path, 0o755)
        self._tokens_file = open(self.path / TOKENS_FILE, "wb")
        self._offsets_file = open(self.path / OFFSETS_FILE, "wb")
        self._tokens_hash = hashlib.sha256()
        self._offsets_hash = hashlib.sha256()
        self._offsets = np.empty(_OFFSET_BUFFER_ITEMS, np.int64)
        self._offsets[0] = 0
        self._n_buffered = 1
        self.n_docs = 0
        self.n_tokens = 0
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._closed:
            self.abort()
            if exc_type is None:
                raise RuntimeError("StoreWriter left without close(meta): nothing was written")
        return False

    def append(self, tokens, lengths):
        """Append documents: ``tokens`` holds them back to back, ``lengths[i]`` is document i's length."""
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise TypeError("lengths must be a 1-D integer array")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError("tokens must be a 1-D integer array")
        if lengths.size and lengths.min() < 0:
            raise ValueError("document lengths must be non-negative")
        if int(lengths.sum()) != tokens.shape[0]:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.shape[0]} tokens were given")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got {tokens.min()}..{tokens.max()}")
        ends = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        self._write_tokens(tokens)
        self._buffer_offsets(ends)

    def _write_tokens(self, tokens):
        data = np.ascontiguousarray(tokens.astype(self.dtype, copy=False))
        self._tokens_file.write(data)
        self._tokens_hash.update(data)
        self.n_tokens += data.shape[0]

    def _buffer_offsets(self, ends):
        self.n_docs += ends.shape[0]
        while ends.size:
            room = self._offsets.shape[0] - self._n_buffered
            take = ends[:room]
            self._offsets[self._n_buffered : self._n_buffered + take.size] = take
            self._n_buffered += take.size
            ends = ends[room:]
            if self._n_buffered == self._offsets.shape[0]:
                self._flush_offsets()

    def _flush_offsets(self):
        data = self._offsets[: self._n_buffered].tobytes()
        self._offsets_file.write(data)
        self._offsets_hash.update(data)
        self._n_buffered = 0

    def close(self, meta):
        """Finish the store: write meta.json (``meta`` plus what the writer knows) and rename into place."""
        if self._closed:
            raise RuntimeError("StoreWriter already closed")
        self._flush_offsets()
        self._tokens_file.close()
        self._offsets_file.close()
        full_meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "special_ids": {name: None for name in SPECIAL_NAMES},
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "byteorder": sys.byteorder,
        }
        full_meta.update(meta)
        full_meta["special_ids"] = {name: full_meta["special_ids"].get(name) for name in SPECIAL_NAMES}
        full_meta["checksums"] = {
            TOKENS_FILE: self._tokens_hash.hexdigest(),
            OFFSETS_FILE: self._offsets_hash.hexdigest(),
        }
        with open(self.path / META_FILE, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=2, sort_keys=True)
            f.write("\n")
        _replace_directory(self.path, self.output, self.overwrite)
        self._closed = True
        return TokenStore.open(self.output)

    def abort(self):
        """Drop everything written so far; the destination is left untouched."""
        if self._closed:
            return
        self._tokens_file.close()
        self._offsets_file.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._closed = True


def _check_destination(output, overwrite):
    if not output.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    # overwrite=True only ever deletes an existing store or an empty directory, never user files.
    if output.is_dir() and not any(output.iterdir()):
        return
    if not (output / META_FILE).is_file():
        raise FileExistsError(f"{output} exists and is not a token store; refusing to overwrite it")


def _replace_directory(tmp, output, overwrite):
    if output.exists() and overwrite:
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _as_store(store):
    return store if isinstance(store, TokenStore) else TokenStore.open(store)


def merge_stores(stores, output, *, overwrite=False):
    """Concatenate shard stores into one (offsets rebased, no re-tokenisation).

    All shards must share the tokenizer (same vocabulary fingerprint, vocab size and special ids).
    The merged store equals preparing the shards' inputs in order in one run, up to "source"/"args".
    """
    shards = [_as_store(store) for store in stores]
    if not shards:
        raise ValueError("merge_stores needs at least one store")
    first = shards[0]
    for key in ("vocab_size", "special_ids", "tokenizer_fingerprint", "dtype"):
        for shard in shards[1:]:
            if shard.meta.get(key) != first.meta.get(key):
                raise ValueError(
                    f"cannot merge {shard.path} into {first.path}: {key} differs "
                    f"({shard.meta.get(key)!r} != {first.meta.get(key)!r}); shards must share a tokenizer"
                )
    with StoreWriter(output, vocab_size=first.vocab_size, overwrite=overwrite) as writer:
        for shard in shards:
            # Tokens and offsets are copied in independent fixed-size chunks, so one huge document
            # cannot blow the memory bound. Ids need no range check: the vocabularies are identical.
            base = writer.n_tokens
            for start in range(0, shard.n_tokens, _CHUNK_ITEMS):
                writer._write_tokens(shard.tokens[start : start + _CHUNK_ITEMS])
            for start in range(1, len(shard) + 1, _CHUNK_ITEMS):
                writer._buffer_offsets(shard.offsets[start : start + _CHUNK_ITEMS] + base)
        if first.tokenizer_dir.is_dir():
            shutil.copytree(first.tokenizer_dir, writer.path / TOKENIZER_DIR)
        keep = {k: v for k, v in first.meta.items() if k not in ("n_docs", "n_tokens", "checksums", "source", "args")}
        keep["source"] = [source for shard in shards for source in _as_list(shard.meta.get("source"))]
        keep["args"] = {"merged_from": [str(shard.path) for shard in shards]}
        return writer.close(keep)


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
