"""Megatron-LM indexed datasets (PREFIX.bin + PREFIX.idx): opened as token stores in place, and written.

The format megatron-core's ``IndexedDataset`` reads and ``IndexedDatasetBuilder`` writes (index version 1,
little-endian)::

    PREFIX.idx  b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count S,
                u64 document count D (the entries of document_indices: documents + 1), then
                int32 sequence_lengths[S], int64 sequence_pointers[S] (byte offsets into .bin),
                int64 document_indices[D] (document d is sequences document_indices[d] up to
                document_indices[d + 1]), and int8 sequence_modes[S] in multimodal datasets only
    PREFIX.bin  the sequences' tokens back to back, in the dtype of the code

A document is several sequences when the corpus was split into sentences (preprocess_data.py
--split-sentences); fastlm's documents are Megatron's documents. Opening reads only the .idx: the
.bin is memory-mapped, never scanned, so it takes the same time for a billion tokens as for a thousand.
"""
import functools
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from fastlm.store import _CHUNK_ITEMS, SPECIAL_NAMES, StoreError, TokenStore

FORMAT = "megatron-indexed-dataset"
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType, code -> numpy dtype (the .bin is little-endian).
DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}
_CODE_OF = {name: code for code, name in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# A sequence length is an int32 in the index: a longer document is written as several sequences.
MAX_SEQUENCE_LENGTH = (1 << 31) - 1


def dataset_paths(path):
    """(prefix, PREFIX.idx, PREFIX.bin) for a Megatron dataset given as its prefix or either file."""
    text = os.fspath(path)
    if text.endswith((".idx", ".bin")):
        text = text[:-4]
    return Path(text), Path(text + ".idx"), Path(text + ".bin")


def is_indexed_dataset(path):
    """Whether ``path`` names a Megatron dataset (its prefix or one of its files) rather than a store
    directory: a path ending in .bin/.idx, or a prefix with a .idx or .bin beside it."""
    path = Path(path)
    if path.is_dir():
        return False
    _, idx, bin_ = dataset_paths(path)
    return path.suffix in (".idx", ".bin") or idx.exists() or bin_.exists()


def _no_tokenizer(prefix):
    return StoreError(
        f"{prefix} is a Megatron-LM indexed dataset: it holds token ids but records no tokenizer; give the "
        "tokenizer its ids come from (fastlm train --tokenizer_name or --model_name_or_path, "
        "fastlm inspect --tokenizer)")


class MegatronStore(TokenStore):
    """A Megatron indexed dataset seen as a read-only token store.

    ``tokens`` is a memmap of the .bin in the dataset's own dtype; ``offsets`` (computed from the
    sequence lengths) bound Megatron's documents. It records no tokenizer, vocabulary size, special
    ids or text bytes: ``load_tokenizer()`` and ``tokenizer_dir`` raise StoreError saying a tokenizer
    must be given, ``vocab_size`` is None, ``doc_bytes`` is None, and ``max_token_id`` is one pass over
    the .bin on first use (see token_id_range). ``meta["checksums"]`` holds the .idx's sha256: an
    identity of the dataset's layout (every sequence's length and place), not of its token values.
    """

    @classmethod
    def open(cls, path, *, verify=False):
        """Map PREFIX.bin after checking PREFIX.idx against it; verify=True also scans the token ids."""
        prefix, idx_path, bin_path = dataset_paths(path)
        for file in (idx_path, bin_path):
            if not file.is_file():
                raise StoreError(f"{file} is missing: a Megatron-LM indexed dataset is {prefix}.bin + {prefix}.idx")
        dtype, n_sequences, n_doc_indices, data_start = _read_header(idx_path)
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        lengths = np.frombuffer(index, np.dtype("<i4"), n_sequences, data_start)
        pointers = np.frombuffer(index, np.dtype("<i8"), n_sequences, data_start + 4 * n_sequences)
        doc_indices = np.frombuffer(index, np.dtype("<i8"), n_doc_indices, data_start + 12 * n_sequences)
        starts = _sequence_starts(idx_path, lengths, pointers, dtype.itemsize)
        n_tokens = int(starts[-1])
        _check_document_indices(idx_path, doc_indices, n_sequences)
        bin_size = bin_path.stat().st_size
        if bin_size != n_tokens * dtype.itemsize:
            problem = "truncated" if bin_size < n_tokens * dtype.itemsize else "longer than its index says"
            raise StoreError(f"{bin_path} has {bin_size} bytes but {idx_path.name}'s sequences hold {n_tokens} "
                             f"{dtype} tokens ({n_tokens * dtype.itemsize} bytes): the .bin is {problem}")
        # Offsets of the documents: where their first sequence starts (the common case, one sequence per
        # document, is the starts array itself).
        offsets = starts if n_doc_indices == n_sequences + 1 and _is_arange(doc_indices) else starts[doc_indices]
        offsets.flags.writeable = False
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else _empty(dtype)
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": None,
            "special_ids": {name: None for name in SPECIAL_NAMES},
            "tokenizer_name": None,
            "n_docs": n_doc_indices - 1,
            "n_sequences": n_sequences,
            "n_tokens": n_tokens,
            "source": [str(idx_path.resolve()), str(bin_path.resolve())],
            # Keyed "idx", not by file name: a renamed or moved dataset is still the same data.
            "checksums": {"idx": _sha256(index)},
        }
        store = cls(prefix, tokens, offsets, meta)
        if verify:
            store.verify()
        return store

    def verify(self):
        """Scan every token id (a Megatron dataset records no checksum of its .bin); raises StoreError."""
        self.token_id_range()
        return True

    @property
    def tokenizer_dir(self):
        raise _no_tokenizer(self.path)

    def load_tokenizer(self):
        raise _no_tokenizer(self.path)

    @property
    def vocab_size(self):
        """None: a Megatron dataset does not record the vocabulary its ids come from."""
        return None

    @functools.cached_property
    def max_token_id(self):
        """The largest token id (None without tokens): one pass over the .bin on first use."""
        return self.token_id_range()[1]

    def token_id_range(self):
        """(smallest, largest) token id, (None, None) without tokens: reads the whole .bin in bounded chunks.
        StoreError when an id is negative or not an integer (a signed or float dtype allows both)."""
        if self.tokens.dtype.kind == "f":
            raise StoreError(f"{self.path} holds {self.tokens.dtype} values, not integer token ids")
        if not self.n_tokens:
            return None, None
        low, high = None, None
        for start in range(0, self.n_tokens, _CHUNK_ITEMS):
            chunk = self.tokens[start : start + _CHUNK_ITEMS]
            low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
            high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
        if low < 0:
            raise StoreError(f"{self.path}.bin holds a negative token id ({low})")
        return low, high


def _empty(dtype):
    # np.memmap refuses empty files; an empty read-only array behaves the same.
    empty = np.empty(0, dtype)
    empty.flags.writeable = False
    return empty


def _read_header(idx_path):
    """(token dtype, sequence count, document index count, where the arrays start), after checking the
    header and that the file holds exactly the arrays it announces."""
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size or not header.startswith(INDEX_MAGIC):
        raise StoreError(f"{idx_path} is not a Megatron-LM index (no {INDEX_MAGIC!r} header)")
    _, version, code, n_sequences, n_doc_indices = _HEADER.unpack(header)
    if version != INDEX_VERSION:
        raise StoreError(f"{idx_path} has index version {version}; fastlm reads version {INDEX_VERSION}")
    if code not in DTYPE_CODES:
        raise StoreError(f"{idx_path} has dtype code {code}, which megatron-core does not define "
                         f"(codes: {', '.join(f'{c}={n}' for c, n in DTYPE_CODES.items())})")
    dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
    if dtype.kind == "f":
        raise StoreError(f"{idx_path} stores {dtype.name} values (dtype code {code}): token ids are integers")
    expected = _HEADER.size + 4 * n_sequences + 8 * n_sequences + 8 * n_doc_indices
    size = idx_path.stat().st_size
    if size == expected + n_sequences and n_sequences:
        raise StoreError(f"{idx_path} holds sequence modes (a multimodal dataset): fastlm reads token datasets only")
    if size != expected:
        raise StoreError(f"{idx_path} has {size} bytes but its header announces {n_sequences} sequences and "
                         f"{n_doc_indices} document indices ({expected} bytes): the index is truncated or corrupt")
    if n_doc_indices < 1:
        raise StoreError(f"{idx_path} is corrupt: it has no document indices (at least the leading 0)")
    return dtype, n_sequences, n_doc_indices, _HEADER.size


def _sequence_starts(idx_path, lengths, pointers, itemsize):
    """Token offset of every sequence plus the total (S + 1 int64), after checking that the sequences
    lie back to back in the .bin, each pointer where the lengths before it end."""
    if lengths.size and int(lengths.min()) < 0:
        raise StoreError(f"{idx_path} is corrupt: sequence {int(np.argmin(lengths))} has a negative length")
    starts = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, dtype=np.int64, out=starts[1:])
    for start in range(0, lengths.shape[0], _CHUNK_ITEMS):
        stop = min(start + _CHUNK_ITEMS, lengths.shape[0])
        bad = pointers[start:stop] != starts[start:stop] * itemsize
        if bad.any():
            i = start + int(np.argmax(bad))
            raise StoreError(f"{idx_path} is corrupt: sequence {i} starts at byte {int(pointers[i])} of the .bin, "
                             f"but the lengths before it add up to byte {int(starts[i]) * itemsize}")
    return starts


def _check_document_indices(idx_path, doc_indices, n_sequences):
    if doc_indices[0] != 0 or doc_indices[-1] != n_sequences:
        raise StoreError(f"{idx_path} is corrupt: document indices run from {int(doc_indices[0])} to "
                         f"{int(doc_indices[-1])}, expected 0 to the sequence count {n_sequences}")
    for start in range(0, doc_indices.shape[0] - 1, _CHUNK_ITEMS):
        chunk = doc_indices[start : start + _CHUNK_ITEMS + 1]
        if np.any(chunk[1:] < chunk[:-1]):
            bad = start + int(np.argmax(chunk[1:] < chunk[:-1]))
            raise StoreError(f"{idx_path} is corrupt: document indices decrease at document {bad}")


def _is_arange(values):
    return all(np.array_equal(values[s : s + _CHUNK_ITEMS], np.arange(s, min(s + _CHUNK_ITEMS, values.shape[0])))
               for s in range(0, values.shape[0], _CHUNK_ITEMS))


def _sha256(buffer):
    digest = hashlib.sha256()
    for start in range(0, buffer.shape[0], _CHUNK_ITEMS):
        digest.update(buffer[start : start + _CHUNK_ITEMS])
    return digest.hexdigest()
