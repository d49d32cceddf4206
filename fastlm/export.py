"""`fastlm export`: a token store written in another tool's format (Megatron-LM, nanoGPT), streaming and atomic.

    from fastlm.export import export_store
    export_store("data/wiki", "out/wiki_text_document", format="megatron")   # out/wiki_text_document.{bin,idx}
    export_store("data/wiki", "out/train.bin", format="nanogpt")             # flat uint16 ids

Both read the store in chunks of a fixed number of tokens, so a store larger than memory exports with
flat memory; every file is written under a temporary name beside its destination and renamed into place.

megatron: one sequence per document (a document longer than an int32 index entry allows is several
    sequences of one document), dtype the store's (uint16 stays uint16; uint32 ids become int32, or int64
    when the vocabulary does not fit int32: megatron-core has no uint32 code). megatron-core's
    IndexedDataset(prefix) reads back the store's documents and tokens.
nanogpt: the tokens as nanoGPT's data/*/prepare.py writes train.bin: uint16, native (little-endian), every
    document followed by the end-of-text id unless it already ends with it (a store prepared with
    --append-eos gets nothing added, an empty document becomes one end-of-text id, as nanoGPT's own
    prepare.py does for an empty text). The id is the store's eos, or eot_id (--eot-id) when it has
    none (a Megatron dataset) or another one is wanted.
"""
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from fastlm.megatron import _CODE_OF, _HEADER, INDEX_MAGIC, INDEX_VERSION, MAX_SEQUENCE_LENGTH, dataset_paths
from fastlm.store import _CHUNK_ITEMS, TokenStore
from fastlm.writes import WRITE_ERRNOS, WriteFailed, write_failed

FORMATS = ("megatron", "nanogpt")
_NANOGPT_DTYPE = np.dtype("<u2")


def export_store(store, output, *, format, overwrite=False, eot_id=None):
    """Write ``store`` (a TokenStore or a path TokenStore.open takes) in ``format``; returns a one-line summary."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    store = store if isinstance(store, TokenStore) else TokenStore.open(store)
    if format == "megatron":
        if eot_id is not None:
            raise ValueError("eot_id only applies to the nanogpt format (Megatron keeps the documents as they are)")
        return write_megatron(store, output, overwrite=overwrite)
    return write_nanogpt(store, output, eot_id=eot_id, overwrite=overwrite)


# --- Megatron-LM ---------------------------------------------------------------------------------------

def megatron_dtype(store):
    """The dtype the exported .bin holds: the store's, where megatron-core has a code for it."""
    if store.tokens.dtype.name in _CODE_OF:
        return np.dtype(store.tokens.dtype.name).newbyteorder("<")
    # uint32: megatron-core has no code for it. The vocabulary bounds every id without a scan.
    top = store.vocab_size - 1 if store.vocab_size is not None else store.max_token_id
    return np.dtype("<i4" if top is None or top <= np.iinfo(np.int32).max else "<i8")


def write_megatron(store, output, *, overwrite=False):
    """OUT.bin + OUT.idx (``output`` is the prefix, or either file) that megatron-core's IndexedDataset reads
    back with the store's documents and tokens; returns a one-line summary."""
    prefix, idx_path, bin_path = dataset_paths(output)
    for path in (idx_path, bin_path):
        _check_destination(path, overwrite)
    dtype = megatron_dtype(store)
    offsets = store.offsets
    n_docs = len(store)
    n_sequences = sum(int(_sequence_counts(offsets[a : a + _CHUNK_ITEMS + 1]).sum())
                      for a in range(0, n_docs, _CHUNK_ITEMS))
    # One file at a time, so a failed write is reported against the file it failed in.
    with _temp_beside(bin_path) as (bin_file, bin_tmp):
        for start in range(0, store.n_tokens, _CHUNK_ITEMS):
            bin_file.write(np.ascontiguousarray(store.tokens[start : start + _CHUNK_ITEMS], dtype).data)
        bin_file.close()
        with _temp_beside(idx_path) as (idx_file, idx_tmp):
            _write_megatron_index(idx_file, offsets, dtype, n_sequences)
            idx_file.close()
            # The index goes last: the pair never looks complete with an old index over the new tokens.
            idx_path.unlink(missing_ok=True)
            os.replace(bin_tmp, bin_path)
            os.replace(idx_tmp, idx_path)
    return (f"{prefix}.bin + .idx: {n_docs:,} documents, {n_sequences:,} sequences, "
            f"{store.n_tokens:,} tokens ({dtype.name})")


def _write_megatron_index(idx_file, offsets, dtype, n_sequences):
    n_docs = offsets.shape[0] - 1
    idx_file.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _CODE_OF[dtype.name], n_sequences, n_docs + 1))
    # Three sections, one after the other, each streamed over the documents in chunks.
    for lengths, _ in _sequences(offsets):
        idx_file.write(np.ascontiguousarray(lengths, "<i4").data)
    for _, starts in _sequences(offsets):
        idx_file.write(np.ascontiguousarray(starts * dtype.itemsize, "<i8").data)  # byte pointers
    idx_file.write(np.zeros(1, "<i8").data)
    done = 0
    for start in range(0, n_docs, _CHUNK_ITEMS):
        counts = _sequence_counts(offsets[start : start + _CHUNK_ITEMS + 1])
        idx_file.write(np.ascontiguousarray(done + np.cumsum(counts, dtype=np.int64), "<i8").data)
        done += int(counts.sum())


def _sequence_counts(offsets):
    """Sequences per document (offsets of a run of documents): 0 for an empty one, more than one past the
    int32 length an index entry holds."""
    lengths = np.diff(np.asarray(offsets, np.int64))
    return -(-lengths // MAX_SEQUENCE_LENGTH)


def _sequences(offsets):
    """(sequence lengths, sequence start tokens) of the documents, in chunks of documents."""
    for start in range(0, offsets.shape[0] - 1, _CHUNK_ITEMS):
        bounds = np.asarray(offsets[start : start + _CHUNK_ITEMS + 1], np.int64)
        counts = _sequence_counts(bounds)
        doc_of = np.repeat(np.arange(counts.shape[0]), counts)
        part = np.arange(doc_of.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
        lengths = np.minimum(MAX_SEQUENCE_LENGTH, (bounds[1:] - bounds[:-1])[doc_of] - part * MAX_SEQUENCE_LENGTH)
        yield lengths, bounds[:-1][doc_of] + part * MAX_SEQUENCE_LENGTH


# --- nanoGPT -------------------------------------------------------------------------------------------

def write_nanogpt(store, output, *, eot_id=None, overwrite=False):
    """A flat uint16 token file as nanoGPT's prepare.py writes (``np.memmap(output, np.uint16)`` reads it),
    each document followed by the end-of-text id unless it ends with it; returns a one-line summary."""
    output = Path(output)
    eot = _end_of_text(store, eot_id)
    _check_fits_uint16(store, eot)
    _check_destination(output, overwrite)
    offsets, tokens, n = store.offsets, store.tokens, store.n_tokens
    chunks = [(a, min(a + _CHUNK_ITEMS, n)) for a in range(0, n, _CHUNK_ITEMS)] or [(0, 0)]
    added = 0
    with _temp_beside(output) as (file, tmp):
        for a, b in chunks:
            # The documents that end in [a, b) (in [a, b] for the last chunk): their end-of-text goes here.
            first = int(np.searchsorted(offsets[1:], a, "left"))
            last = len(store) if b == n else int(np.searchsorted(offsets[1:], b, "left"))
            ends = np.asarray(offsets[1 + first : 1 + last], np.int64)
            starts = np.asarray(offsets[first:last], np.int64)
            nonempty = ends > starts
            needs = ~nonempty
            needs[nonempty] = tokens[ends[nonempty] - 1] != eot
            inserts = ends[needs] - a
            file.write(np.insert(np.asarray(tokens[a:b]).astype(_NANOGPT_DTYPE), inserts, eot).data)
            added += int(inserts.shape[0])
        file.close()
        os.replace(tmp, output)
    return f"{output}: {n + added:,} tokens (uint16), {len(store):,} documents, {added:,} end-of-text ids ({eot}) added"


def _end_of_text(store, eot_id):
    eot = eot_id if eot_id is not None else store.special_ids.get("eos")
    if eot is None:
        raise ValueError(f"{store.path} records no end-of-text (eos) id: pass eot_id (--eot-id), e.g. 50256 for GPT-2")
    if not isinstance(eot, (int, np.integer)) or isinstance(eot, bool) or not 0 <= eot < 1 << 16:
        raise ValueError(f"the end-of-text id must be an integer in [0, 65536) for nanoGPT's uint16 file, got {eot!r}")
    return int(eot)


def _check_fits_uint16(store, eot):
    if store.vocab_size is not None:
        if store.vocab_size > 1 << 16:
            raise ValueError(f"{store.path} has a vocabulary of {store.vocab_size:,} ids; nanoGPT's uint16 token "
                             "files hold ids below 65,536: export it with --format megatron instead")
        return
    top = store.max_token_id  # no vocabulary recorded (a Megatron dataset): one pass over the tokens
    if top is not None and top >= 1 << 16:
        raise ValueError(f"{store.path} holds token id {top:,}; nanoGPT's uint16 token files hold ids below 65,536: "
                         "export it with --format megatron instead")


# --- files ---------------------------------------------------------------------------------------------

def _check_destination(path, overwrite):
    if path.is_dir():
        raise FileExistsError(f"{path} is a directory; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def _temp_beside(path):
    """(open binary file, its path) under a temporary name beside ``path``; removed unless renamed away. A write
    that fails for want of space (disk full, a file-size limit) raises WriteFailed naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; an output should be as readable as any other
    try:
        with os.fdopen(fd, "wb") as file:
            yield file, tmp
    except OSError as error:
        if error.errno in WRITE_ERRNOS and not isinstance(error, WriteFailed):
            raise write_failed(error.errno, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
