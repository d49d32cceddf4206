"""Memory-mapped token store: a directory the kernels and the runner read without copies.

Layout of a store directory::

    tokens.bin    every document's token ids back to back (uint16 when the vocabulary fits
                  in 65536 ids, else uint32), native little-endian
    offsets.bin   int64, n_docs + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]
    bytes.bin     int64, n_docs entries: the UTF-8 bytes of each document's text (for bits per
                  byte); stores written before it existed have none and still open
    meta.json     format version, dtype, vocabulary size, special ids, tokenizer name and
                  vocabulary fingerprint, counts, the largest token id, source, sha256 of the
                  data files, the arguments (field types are checked on open)
    tokenizer/    the tokenizer in save_pretrained form (written by fastlm.prepare)

Writers build the whole directory under a temporary name beside the destination and rename it at
the end, so an interrupted run never leaves anything that opens as a store; the next writer into the
same destination removes what a killed one left (temp_dir_beside). Only numpy is imported here:
readers (the runner, data loader workers) stay light.
"""
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastlm.writes import failed_write, write_failed

FORMAT = "fastlm-token-store"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.bin"
BYTES_FILE = "bytes.bin"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPECIAL_NAMES = ("eos", "bos", "pad", "mask", "cls", "sep", "unk")
# What a store directory may hold: --overwrite replaces a directory only if it holds nothing else.
STORE_ENTRIES = (TOKENS_FILE, OFFSETS_FILE, BYTES_FILE, META_FILE, TOKENIZER_DIR)
# Inside a temporary directory: which process made it, so a later run can tell a dead one's leftovers
# from a live one's work in progress.
_OWNER_FILE = ".fastlm-owner.json"

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


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_int(value):
    # bool is an int subclass and JSON floats such as 11.0 compare equal to ints: neither is a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta_path, meta):
    """The token dtype, after checking the type and range of every field the readers rely on."""
    def corrupt(problem):
        return StoreError(f"{meta_path} is corrupt: {problem}")

    for name, low in (("n_docs", 0), ("n_tokens", 0), ("vocab_size", 1)):
        if name not in meta:
            raise corrupt(f"the field {name!r} is missing")
        if not _is_int(meta[name]) or meta[name] < low:
            raise corrupt(f"{name} must be an integer >= {low}, got {meta[name]!r}")
    vocab_size = meta["vocab_size"]
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise corrupt(f"token dtype {meta.get('dtype')!r} is not uint16 or uint32")
    dtype = np.dtype(meta["dtype"])
    if vocab_size > 1 << (8 * dtype.itemsize):
        raise corrupt(f"vocab_size {vocab_size} does not fit in {dtype} token ids")
    max_id = meta.get("max_token_id")
    if max_id is not None and not (_is_int(max_id) and 0 <= max_id < vocab_size):
        raise corrupt(f"max_token_id must be an integer in [0, vocab_size={vocab_size}), got {max_id!r}")
    specials = meta.get("special_ids", {})
    if not isinstance(specials, dict):
        raise corrupt(f"special_ids must be an object, got {specials!r}")
    for name, token_id in specials.items():
        if token_id is not None and not (_is_int(token_id) and 0 <= token_id < vocab_size):
            raise corrupt(f"special id {name}={token_id!r} is not an integer in [0, vocab_size={vocab_size})")
    checksums = meta.get("checksums", {})
    if not (isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())):
        raise corrupt(f"checksums must map file names to sha256 strings, got {checksums!r}")
    if meta.get("byteorder", sys.byteorder) != sys.byteorder:
        # The memmaps read native byte order: a store from a big-endian machine would give wrong ids.
        raise StoreError(f"{meta_path.parent} was written on a {meta['byteorder']}-endian machine; this one is "
                         f"{sys.byteorder}-endian: re-run fastlm prepare here")
    return dtype


class TokenStore:
    """A read-only view of a token store directory.

    ``store.tokens`` and ``store.offsets`` are read-only ``np.memmap``s; ``store[i]`` /
    ``store.doc(i)`` is document i (a memmap view, no copy); ``store[a:b]`` is a store over
    documents a..b-1 sharing the same token memmap; ``store.iter_batches(n)`` walks the store in
    views of n documents. ``store.doc_bytes[i]`` is the UTF-8 byte length of document i's text
    (int64 memmap; None for stores written before fastlm recorded it), so bits per byte =
    sum of token losses / ln 2 / ``store.n_bytes``.
    """

    def __init__(self, path, tokens, offsets, meta, doc_bytes=None):
        # Use TokenStore.open(path); this constructor trusts its arguments.
        self.path = Path(path)
        self.tokens = tokens
        self.offsets = offsets
        self.meta = meta
        self.doc_bytes = doc_bytes

    @classmethod
    def open(cls, path, *, verify=False):
        """Map a store read-only after checking it; verify=True also checks both sha256 sums.

        A Megatron-LM indexed dataset, given as its prefix or either of its files, opens in place as a
        fastlm.megatron.MegatronStore."""
        from fastlm.megatron import MegatronStore, is_indexed_dataset

        if is_indexed_dataset(path):
            return MegatronStore.open(path, verify=verify)
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
        if not _is_int(meta.get("format_version")) or meta["format_version"] != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {meta.get('format_version')!r}; this fastlm reads "
                f"version {FORMAT_VERSION}: re-run fastlm prepare or upgrade fastlm"
            )
        dtype = _check_meta(meta_path, meta)
        n_docs, n_tokens = meta["n_docs"], meta["n_tokens"]

        tokens = cls._map(path / TOKENS_FILE, dtype, n_tokens)
        offsets = cls._map(path / OFFSETS_FILE, np.dtype(np.int64), n_docs + 1)
        has_bytes = BYTES_FILE in (meta.get("checksums") or {})
        doc_bytes = cls._map(path / BYTES_FILE, np.dtype(np.int64), n_docs) if has_bytes else None
        store = cls(path, tokens, offsets, meta, doc_bytes)
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
        """Recompute the sha256 of the data files and compare with meta.json; raises StoreError."""
        expected = self.meta.get("checksums", {})
        for name in (TOKENS_FILE, OFFSETS_FILE) + ((BYTES_FILE,) if self.doc_bytes is not None else ()):
            want = expected.get(name)
            if want is None:
                raise StoreError(f"{self.path / META_FILE} has no checksum for {name}")
            got = sha256_file(self.path / name)
            if got != want:
                raise StoreError(f"{self.path / name} is corrupt: sha256 {got} != {want} in meta.json")
        return True

    @property
    def tokenizer_dir(self):
        """<store>/tokenizer, in save_pretrained form: AutoTokenizer.from_pretrained(it) works offline."""
        return self.path / TOKENIZER_DIR

    def load_tokenizer(self):
        """The tokenizer the store was made with (a transformers fast tokenizer, offline). StoreError
        when tokenizer/ is missing or is not the one the ids come from; ValueError when it is broken."""
        from fastlm.tokenizer import fingerprint, load_tokenizer

        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            made_with = self.meta.get("tokenizer_name")
            raise StoreError(f"{self.path} has no tokenizer ({self.tokenizer_dir / 'tokenizer.json'} is missing"
                             f"{f'; it was made with {made_with}' if made_with else ''}): copy the store with its "
                             "tokenizer/ directory, prepare it again, or give the tokenizer (fastlm inspect --tokenizer)")
        tokenizer = load_tokenizer(self.tokenizer_dir)
        recorded = self.meta.get("tokenizer_fingerprint")
        if recorded is not None and fingerprint(tokenizer) != recorded:
            raise StoreError(f"{self.tokenizer_dir} is not the tokenizer {self.path} was made with (its vocabulary "
                             "fingerprint differs from meta.json's)")
        return tokenizer

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

    @functools.cached_property
    def max_token_id(self):
        """The largest token id in the store, None when it holds no tokens.

        Recorded in meta.json by fastlm prepare/merge; a store written before fastlm recorded it (and a
        slice of a store) gets one pass over its token memmap on first use, kept on this object only:
        the store's files are never rewritten."""
        if self.n_tokens == self.meta.get("n_tokens") and "max_token_id" in self.meta:
            return self.meta["max_token_id"]
        return int(self.tokens.max()) if self.n_tokens else None

    @property
    def n_bytes(self):
        """UTF-8 bytes of all documents' text (None without doc_bytes)."""
        if self.doc_bytes is None:
            return None
        return sum(int(self.doc_bytes[start : start + _CHUNK_ITEMS].sum()) for start in range(0, len(self), _CHUNK_ITEMS))

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
            doc_bytes = None if self.doc_bytes is None else self.doc_bytes[start:stop]
            return type(self)(self.path, tokens, offsets, self.meta, doc_bytes)
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
    ``with`` block by an exception deletes the temporary directory (a failed write in it, such as a
    full disk, is raised as fastlm.writes.WriteFailed naming the file), and a killed process leaves
    only a ``.<name>.tmp-*`` directory that never opens as a store. With ``record_bytes`` every
    append gives each document's text bytes too (bytes.bin).
    """

    def __init__(self, output, *, vocab_size, overwrite=False, record_bytes=False):
        self.output = Path(output)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = int(vocab_size)
        self.overwrite = overwrite
        check_destination(self.output, overwrite)
        self.path = temp_dir_beside(self.output)
        # mkdtemp makes a private 0700 directory; a finished store should be as readable as any output.
        os.chmod(self.path, 0o755)
        self._tokens_file = open(self.path / TOKENS_FILE, "wb")
        self._offsets_file = open(self.path / OFFSETS_FILE, "wb")
        self._tokens_hash = hashlib.sha256()
        self._offsets_hash = hashlib.sha256()
        self.record_bytes = record_bytes
        self._bytes_file = open(self.path / BYTES_FILE, "wb") if record_bytes else None
        self._bytes_hash = hashlib.sha256()
        self.n_bytes = 0
        self._open_bytes = 0  # text bytes of a document appended in part (open_last) so far
        self._open = False
        self._offsets = np.empty(_OFFSET_BUFFER_ITEMS, np.int64)
        self._offsets[0] = 0
        self._n_buffered = 1
        self.n_docs = 0
        self.n_tokens = 0
        self.max_token_id = None
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._closed:
            # Found before abort() removes the files: the heuristics for errors without an errno look at them.
            failed = None if exc is None else failed_write(exc, self.path)
            self.abort()
            if failed is not None:
                path, code = failed
                # Named as the file of the store asked for: the temporary directory is gone.
                raise write_failed(code, self.output / path.relative_to(self.path)) from None
            if exc_type is None:
                raise RuntimeError("StoreWriter left without close(meta): nothing was written")
        return False

    def append(self, tokens, lengths, doc_bytes=None, *, open_last=False):
        """Append documents: ``tokens`` holds them back to back, ``lengths[i]`` is document i's length
        and ``doc_bytes[i]`` its text's UTF-8 bytes (with record_bytes).

        A long document may come in parts: with ``open_last`` the last document goes on in the next
        append, whose first document is its rest (lengths and bytes of the parts add up).
        """
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
        byte_counts = self._check_doc_bytes(doc_bytes, lengths.shape[0])
        if not lengths.size:
            if open_last:
                raise ValueError("open_last needs a document to leave open")
            return
        ends = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        self._write_tokens(tokens)
        if byte_counts is not None:
            byte_counts[0] += self._open_bytes
            self._open_bytes = int(byte_counts[-1]) if open_last else 0
            self._write_doc_bytes(byte_counts[:-1] if open_last else byte_counts)
        self._buffer_offsets(ends[:-1] if open_last else ends)
        self._open = open_last

    def append_store(self, store):
        """Append every document of ``store`` (a TokenStore, or a slice of one, with this writer's dtype):
        its token and byte files are copied as they are and its offsets rebased, with no work per token
        (how prepare joins its workers' parts and merge joins shards)."""
        if self._open:
            raise RuntimeError("append_store: the last appended document is still open (open_last)")
        if store.tokens.dtype != self.dtype:
            raise ValueError(f"{store.path} holds {store.tokens.dtype} tokens; this store holds {self.dtype}")
        if store.max_token_id is not None and store.max_token_id >= self.vocab_size:
            raise ValueError(f"{store.path} holds token id {store.max_token_id}, outside [0, {self.vocab_size})")
        if self.record_bytes and store.doc_bytes is None:
            raise ValueError(f"{store.path} has no text byte counts (bytes.bin) and this store records them")
        base = self.n_tokens - int(store.offsets[0])
        for start in range(0, store.n_tokens, _CHUNK_ITEMS):
            # A memmap view is written and hashed straight from the mapped file's pages.
            chunk = store.tokens[start : start + _CHUNK_ITEMS]
            _write(self._tokens_file, chunk)
            self._tokens_hash.update(chunk)
        self.n_tokens += store.n_tokens
        if store.max_token_id is not None:
            self.max_token_id = max(store.max_token_id, -1 if self.max_token_id is None else self.max_token_id)
        for start in range(1, len(store) + 1, _CHUNK_ITEMS):
            self._buffer_offsets(store.offsets[start : start + _CHUNK_ITEMS] + base)
        for start in range(0, len(store) if self.record_bytes else 0, _CHUNK_ITEMS):
            self._write_doc_bytes(store.doc_bytes[start : start + _CHUNK_ITEMS])

    def _check_doc_bytes(self, doc_bytes, n):
        if not self.record_bytes:
            if doc_bytes is not None:
                raise ValueError("doc_bytes given to a StoreWriter made without record_bytes=True")
            return None
        if doc_bytes is None:
            raise ValueError("this StoreWriter records text bytes: pass doc_bytes")
        byte_counts = np.array(doc_bytes, np.int64)
        if byte_counts.shape != (n,) or (n and byte_counts.min() < 0):
            raise ValueError(f"doc_bytes must hold {n} non-negative counts, one per document")
        return byte_counts

    def _write_doc_bytes(self, byte_counts):
        data = np.ascontiguousarray(byte_counts, np.int64)
        _write(self._bytes_file, data)
        self._bytes_hash.update(data)
        self.n_bytes += int(data.sum())

    def _write_tokens(self, tokens):
        data = np.ascontiguousarray(tokens.astype(self.dtype, copy=False))
        if data.size:
            batch_max = int(data.max())
            self.max_token_id = batch_max if self.max_token_id is None else max(self.max_token_id, batch_max)
        _write(self._tokens_file, data)
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
        _write(self._offsets_file, data)
        self._offsets_hash.update(data)
        self._n_buffered = 0

    def close(self, meta):
        """Finish the store: write meta.json (``meta`` plus what the writer knows) and rename into place."""
        if self._closed:
            raise RuntimeError("StoreWriter already closed")
        if self._open:
            raise RuntimeError("StoreWriter.close: the last document was left open (open_last) and never finished")
        self._flush_offsets()
        self._close_files()
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
        # What the writer saw wins over anything copied from a shard's meta.
        full_meta["max_token_id"] = self.max_token_id
        full_meta["checksums"] = {
            TOKENS_FILE: self._tokens_hash.hexdigest(),
            OFFSETS_FILE: self._offsets_hash.hexdigest(),
        }
        if self.record_bytes:
            full_meta["n_bytes"] = self.n_bytes
            full_meta["checksums"][BYTES_FILE] = self._bytes_hash.hexdigest()
        with open(self.path / META_FILE, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=2, sort_keys=True)
            f.write("\n")
        # Checked again: the destination may have changed in the hours a large prepare takes.
        check_destination(self.output, self.overwrite)
        _replace_directory(self.path, self.output, self.overwrite)
        self._closed = True
        return TokenStore.open(self.output)

    def abort(self):
        """Drop everything written so far; the destination is left untouched."""
        if self._closed:
            return
        try:
            self._close_files()
        except OSError:
            pass  # the buffers of a failed write cannot be flushed either; the files go anyway
        shutil.rmtree(self.path, ignore_errors=True)
        self._closed = True

    def _close_files(self):
        """Close every file (flushing its buffer, where a write may fail too); the first failure is raised."""
        failure = None
        for file in (self._tokens_file, self._offsets_file, self._bytes_file):
            if file is not None and not file.closed:
                try:
                    file.close()
                except OSError as error:
                    error.filename = file.name
                    failure = failure or error
        if failure is not None:
            raise failure


def _write(file, data):
    try:
        file.write(data)
    except OSError as error:
        error.filename = file.name  # a failed write names no file
        raise


def check_destination(output, overwrite):
    """Raise FileExistsError unless ``output`` is free, or ``overwrite`` and it is a token store (possibly
    a broken one) or an empty directory."""
    output = Path(output)
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    # overwrite=True only ever deletes a token store (possibly a broken one) or an empty directory:
    # never a directory that also holds anything else, whatever its meta.json says.
    if not output.is_dir() or output.is_symlink():
        raise FileExistsError(f"{output} exists and is not a token store directory; refusing to overwrite it")
    entries = sorted(entry.name for entry in output.iterdir())
    if not entries:
        return
    foreign = [name for name in entries if name not in STORE_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{output} is not a token store (it holds {shown}); refusing to overwrite it: "
                              "move those files or choose another output")
    try:
        TokenStore.open(output)
    except StoreError as error:
        # A broken store (truncated data files) may be replaced; a stranger's meta.json may not.
        try:
            meta = json.loads((output / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
            raise FileExistsError(f"{output} is not a token store ({error}); refusing to overwrite it") from None


def temp_dir_beside(destination, kind="tmp"):
    """A new private directory ``.<name>.<kind>-XXXXXXXX`` beside ``destination``, to build an output in
    and rename into place; it records its owner process (pid, host, boot, start time).

    First removes the temporary directories that earlier runs left beside the same destination when
    they were killed: only those whose recorded owner is gone, never a live run's (nor one made on
    another host, which cannot be checked from here). Pass the result to ``_replace_directory`` to
    finish, which drops the owner record.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(destination)
    path = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{kind}-", dir=destination.parent))
    (path / _OWNER_FILE).write_text(json.dumps(_this_process()), encoding="utf-8")
    return path


def remove_stale_temp_dirs(destination):
    """Delete the ``.<name>.*`` temporary directories beside ``destination`` whose owner process has
    died; returns their paths. Directories without an owner record are left alone."""
    destination = Path(destination)
    if not destination.parent.is_dir():
        return []
    removed = []
    for entry in destination.parent.iterdir():
        if not entry.name.startswith(f".{destination.name}.") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / _OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # no readable owner record: not ours, or created this instant
        if isinstance(owner, dict) and not _owner_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _this_process():
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "start": stat and stat[1]}


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid):
    """(state, start time in clock ticks since boot) of a Linux process; None without /proc or if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _owner_alive(owner):
    """False only when the process that made a temporary directory has certainly ended."""
    pid = owner.get("pid")
    if not _is_int(pid) or pid <= 0 or owner.get("host") != socket.gethostname():
        return True
    if owner.get("boot") != _boot_id():
        return False  # the machine rebooted since: every process of that boot is gone
    stat = _proc_stat(pid)
    if stat is not None:
        # A zombie has ended; another start time means the pid was reused by a new process.
        return stat[0] not in "ZX" and (owner.get("start") is None or stat[1] == owner["start"])
    if os.name == "nt":
        return True  # os.kill would terminate the process there, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def _replace_directory(tmp, output, overwrite):
    (tmp / _OWNER_FILE).unlink(missing_ok=True)
    if output.exists() and overwrite:
        trash = temp_dir_beside(output, "old")
        os.replace(output, trash / output.name)
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _as_store(store):
    return store if isinstance(store, TokenStore) else TokenStore.open(store)


def merge_stores(stores, output, *, overwrite=False):
    """Concatenate shard stores into one: their files are concatenated and offsets rebased, no re-tokenisation.

    All shards must share the tokenizer (same vocabulary fingerprint, vocab size and special ids).
    The merged store equals preparing the shards' inputs in order in one run, up to "source"/"args".
    """
    shards = [_as_store(store) for store in stores]
    if not shards:
        raise ValueError("merge_stores needs at least one store")
    from fastlm.megatron import MegatronStore  # it imports this module

    for shard in shards:
        if isinstance(shard, MegatronStore):
            # A Megatron dataset records no tokenizer or vocabulary: the merged store could not say whose ids it holds.
            raise ValueError(f"cannot merge {shard.path}: it is a Megatron-LM indexed dataset, and merging joins "
                             "fastlm token stores (which record their tokenizer); merge the fastlm stores it was "
                             "exported from and export the result (fastlm export --format megatron), or join "
                             "Megatron datasets with Megatron-LM's tools/merge_datasets.py")
    first = shards[0]
    for key in ("vocab_size", "special_ids", "tokenizer_fingerprint", "dtype"):
        for shard in shards[1:]:
            if shard.meta.get(key) != first.meta.get(key):
                raise ValueError(
                    f"cannot merge {shard.path} into {first.path}: {key} differs "
                    f"({shard.meta.get(key)!r} != {first.meta.get(key)!r}); shards must share a tokenizer"
                )
    # Text bytes only when every shard has them: a partial bytes.bin would misalign documents.
    record_bytes = all(shard.doc_bytes is not None for shard in shards)
    with StoreWriter(output, vocab_size=first.vocab_size, overwrite=overwrite, record_bytes=record_bytes) as writer:
        for shard in shards:
            writer.append_store(shard)
        if first.tokenizer_dir.is_dir():
            shutil.copytree(first.tokenizer_dir, writer.path / TOKENIZER_DIR)
        # Counts, checksums and the encoding run's timing describe one shard, not the merged store.
        per_shard = ("n_docs", "n_tokens", "n_bytes", "checksums", "source", "args", "encoding")
        keep = {k: v for k, v in first.meta.items() if k not in per_shard}
        sources = [source for shard in shards for source in _as_list(shard.meta.get("source"))]
        # A file split between consecutive shards (fastlm prepare --shard) is one source.
        keep["source"] = [source for i, source in enumerate(sources) if i == 0 or source != sources[i - 1]]
        # Shards of one prepare run (--shard) share its arguments: the merged store keeps them.
        shared = [{k: v for k, v in (shard.meta.get("args") or {}).items() if k not in ("num_proc", "shard")}
                  for shard in shards]
        keep["args"] = {**(shared[0] if all(args == shared[0] for args in shared) else {}),
                        "merged_from": [str(shard.path) for shard in shards]}
        return writer.close(keep)


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
