"""Turn tokenized documents into fixed-size training blocks.

Documents are a flat token array plus int64 offsets: document i is ``tokens[offsets[i]:offsets[i + 1]]``
(the layout of a token store, and of an Arrow list column). Nothing here copies the token array: results
are index arrays, and :meth:`BlockIndex.gather` / :meth:`PackedDocuments.gather` materialise a batch of
blocks into preallocated arrays.

- :func:`pack_blocks` cuts the concatenated document stream into ``block_size`` blocks (the tutorial's
  ``group_texts``), optionally per group of documents (``group_size=1000`` reproduces ``datasets.map``'s
  per-batch remainder exactly), with a separator after each document and strided evaluation windows.
  ``break_mode="complete"`` / ``"eos"`` are fairseq's TokenBlockDataset modes: blocks of whole documents
  in order, or one document per block.
- :func:`pack_documents` packs whole documents into blocks by best-fit decreasing (or in order, or one per
  block), so no document is cut at a block edge unless it is longer than a block; ``position_ids`` restart
  at each document.
- :func:`group_texts` is a drop-in for the tutorial's function inside ``datasets.map(batched=True)``.
"""
import os
from dataclasses import dataclass

import numpy as np

from fastlm._kernels import load
from fastlm._validation import check_positive_int, is_int

_k = load("_packing")
_lists = load("_lists")

TOKEN_DTYPES = (np.uint16, np.uint32, np.int32, np.int64)
_TOKEN_DTYPE_NAMES = {np.dtype(dtype).name for dtype in TOKEN_DTYPES}
IGNORE_INDEX = -100
_INT64_LIMIT = 2**63
REMAINDER_MODES = ("drop", "pad", "keep")
OVERLONG_MODES = ("split", "truncate", "keep")
# fairseq's TokenBlockDataset break modes: "none" cuts the stream anywhere, "complete" fills blocks with
# whole documents in order, "eos" gives each document a block of its own.
BREAK_MODES = ("none", "complete", "eos")
PACKING_MODES = ("best_fit", "complete", "eos")


# --- validation ---------------------------------------------------------------------------------------

def check_token_dtype(dtype, name="tokens"):
    """TypeError for a token dtype the kernels have no version for (a Megatron dataset may hold uint8, int8
    or int16 ids; a torch tensor floats or bools), naming the ones they have. ``dtype``: numpy's, or the name
    of a torch tensor's (which numpy may not know). Never converted here: that would copy a whole memmap."""
    known = dtype in _TOKEN_DTYPE_NAMES if isinstance(dtype, str) else np.dtype(dtype) in TOKEN_DTYPES
    if not known:
        given = dtype if isinstance(dtype, str) else np.dtype(dtype)
        raise TypeError(f"{name} dtype {given} is not supported; use one of uint16, uint32, int32, int64 "
                        f"({name}.astype(numpy.uint16) converts, copying them into memory)")


def _check_tokens(tokens):
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"tokens must be a numpy array or memmap, got {type(tokens).__name__}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    check_token_dtype(tokens.dtype)
    if not tokens.flags.c_contiguous:
        # A silent ascontiguousarray here would copy a multi-GB memmap.
        raise ValueError("tokens must be contiguous (got a strided view); pass the underlying array")
    return tokens


def _check_offsets(offsets, n_tokens):
    if not isinstance(offsets, np.ndarray):
        given = offsets
        offsets = np.asarray(offsets)
        if offsets.size == 0:
            offsets = offsets.astype(np.int64)  # numpy makes [] float64; the count is what is wrong
        elif offsets.dtype.kind in "fO" and offsets.ndim == 1 and all(is_int(x) for x in given):
            # Python ints past int64 become float64 or object arrays: integers, but too large for an offset.
            raise ValueError(f"offsets must lie in [0, {n_tokens}] (the token count), got values beyond 2**63")
    if offsets.dtype != np.int64:
        if offsets.dtype.kind not in "iu":
            raise TypeError(f"offsets must be integers, got dtype {offsets.dtype}")
        if offsets.dtype == np.uint64 and offsets.size and offsets.max() >= _INT64_LIMIT:
            # astype(int64) would wrap them to negative numbers and the message would say "decreasing".
            raise ValueError(f"offsets must lie in [0, {n_tokens}] (the token count), got {offsets.max()}")
        offsets = offsets.astype(np.int64)  # offsets are small next to tokens; a copy is cheap
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError("offsets must be 1-D with n_docs + 1 entries (at least one)")
    offsets = np.ascontiguousarray(offsets)
    if offsets[0] < 0 or offsets[-1] > n_tokens:
        raise ValueError(
            f"offsets must lie in [0, {n_tokens}] (the token count), got {offsets[0]}..{offsets[-1]}"
        )
    if offsets.shape[0] > 1 and np.any(offsets[1:] < offsets[:-1]):
        bad = int(np.argmax(offsets[1:] < offsets[:-1]))
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{bad}]={offsets[bad]} > offsets[{bad + 1}]={offsets[bad + 1]}"
        )
    return offsets


def _check_positive(name, value):
    return _check_int64(name, check_positive_int(name, value))


def _check_int64(name, value):
    """Sizes and ids reach the kernels as int64: a larger Python int would be an OverflowError there."""
    if int(value) >= _INT64_LIMIT:
        raise ValueError(f"{name} must be below 2**63 (it is an int64 in the kernels), got {value!r}")
    return int(value)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_token_id(name, value, optional=True):
    if value is None and optional:
        return None
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative token id, got {value!r}")
    return _check_int64(name, value)


def _check_layout_array(name, array, length=None):
    """A result's index array: the kernels read it unchecked, so it must be exactly what they expect."""
    if not (isinstance(array, np.ndarray) and array.dtype == np.int64 and array.ndim == 1 and array.flags.c_contiguous):
        raise TypeError(f"{name} must be a 1-D C-contiguous int64 array")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    return array.shape[0]


class BlockIndexError(IndexError, ValueError):
    """A block index out of range: an IndexError as for any sequence, and a ValueError as for any other
    bad argument of the API (numpy's AxisError is both for the same reason)."""


def _check_indices(indices, n_blocks):
    indices = np.atleast_1d(np.asarray(indices))
    if indices.size == 0 and indices.dtype.kind == "f":
        indices = indices.astype(np.int64)  # numpy makes [] float64; no index, no batch rows
    if indices.dtype.kind == "O" and indices.ndim == 1 and all(is_int(x) for x in indices):
        raise BlockIndexError(f"block index out of range for {n_blocks} blocks (got integers beyond 2**64)")
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise TypeError(f"indices must be a 1-D array of integers, got dtype {indices.dtype} and shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_blocks):
        bad = indices[(indices < 0) | (indices >= n_blocks)][0]
        raise BlockIndexError(f"block index {bad} out of range for {n_blocks} blocks")
    return np.ascontiguousarray(indices, dtype=np.int64)


def _batch_arrays(n_rows, width, keys, out):
    if out is None:
        _check_batch_fits(n_rows, width, len(keys))
        return {key: np.empty((n_rows, width), dtype=np.int64) for key in keys}
    for key in keys:
        array = out.get(key)
        if array is None or array.shape != (n_rows, width) or array.dtype != np.int64 or not array.flags.c_contiguous:
            raise ValueError(f"out[{key!r}] must be a C-contiguous int64 array of shape {(n_rows, width)}")
    return out


def _physical_memory():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_batch_fits(n_rows, width, n_arrays):
    """Refuse a batch larger than this machine's memory before numpy is asked for it (a block_size far past
    the documents, with remainder="keep" or "pad", pads every row to that width)."""
    needed = n_rows * width * 8 * n_arrays
    if needed > _physical_memory():
        raise ValueError(
            f"gathering {n_rows} block(s) of block_size {width} needs {needed / 2**30:.1f} GiB of int64 rows, more "
            f"than this machine's memory ({_physical_memory() / 2**30:.1f} GiB): use a block_size near the "
            "model's context length"
        )


# --- pack_blocks --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BlockIndex:
    """Blocks cut from the document stream: block b is stream[starts[b]:starts[b] + lengths[b]].

    The stream is the documents concatenated, with ``separator`` after each one when set. ``context[b]``
    leading tokens of a block are context only (label -100): the overlap of strided windows.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    block_size: int
    starts: np.ndarray
    lengths: np.ndarray
    context: np.ndarray
    separator: int | None
    pad_id: int | None

    def __post_init__(self):
        # The kernels run without bounds checks, so an index built or edited by hand is checked here.
        _check_tokens(self.tokens)
        _check_layout_array("offsets", self.offsets)
        _check_offsets(self.offsets, self.tokens.shape[0])
        _check_positive("block_size", self.block_size)
        _check_token_id("separator", self.separator)
        _check_token_id("pad_id", self.pad_id)
        n = _check_layout_array("starts", self.starts)
        _check_layout_array("lengths", self.lengths, n)
        _check_layout_array("context", self.context, n)
        stream_len = _stream_length(self.offsets, self.separator is not None)
        if n and (self.starts.min() < 0 or self.lengths.min() < 0 or self.lengths.max() > self.block_size
                  or np.any(self.starts + self.lengths > stream_len)
                  or np.any(self.context < 0) or np.any(self.context > self.lengths)):
            raise ValueError("block index out of bounds: blocks must lie inside the document stream")

    def __len__(self):
        return self.starts.shape[0]

    @property
    def n_tokens(self):
        """Tokens inside blocks (padding excluded; overlapping windows count their tokens again)."""
        return int(self.lengths.sum())

    @property
    def fill_rate(self):
        """Fraction of block positions holding real tokens rather than padding."""
        return self.n_tokens / (len(self) * self.block_size) if len(self) else 0.0

    def gather(self, indices, out=None):
        """Materialise blocks ``indices`` as int64 ``input_ids``, ``labels``, ``attention_mask`` rows."""
        indices = _check_indices(indices, len(self))
        if self.pad_id is None and indices.size and np.any(self.lengths[indices] < self.block_size):
            raise ValueError("these blocks are shorter than block_size: pass pad_id to pack_blocks to pad them")
        batch = _batch_arrays(indices.shape[0], self.block_size, ("input_ids", "labels", "attention_mask"), out)
        separator = -1 if self.separator is None else self.separator
        _k.gather_stream(
            self.tokens, self.offsets, separator, self.starts, self.lengths, self.context, indices,
            0 if self.pad_id is None else self.pad_id,
            batch["input_ids"], batch["labels"], batch["attention_mask"],
        )
        return batch

    def as_array(self):
        """The blocks as a zero-copy (n_blocks, block_size) view of ``tokens``, where one exists."""
        base = int(self.offsets[0])
        n = len(self)
        arithmetic = np.array_equal(self.starts, np.arange(n, dtype=np.int64) * self.block_size)
        if self.separator is not None or not arithmetic or np.any(self.lengths != self.block_size):
            raise ValueError(
                "only full, contiguous, non-overlapping blocks without a separator are a view of tokens; "
                "use gather()"
            )
        return self.tokens[base:base + n * self.block_size].reshape(n, self.block_size)


def pack_blocks(tokens, offsets, block_size, *, remainder=None, separator=None, stride=None,
                group_size=None, pad_id=None, break_mode="none", overlong=None):
    """Cut the concatenated documents into ``block_size`` blocks.

    Args:
        tokens: 1-D uint16/uint32/int32/int64 array or read-only memmap (never copied).
        offsets: int64 document boundaries, n_docs + 1 entries, non-decreasing, within ``tokens``.
        block_size: tokens per block.
        remainder: what to do with the tokens after the last full block: ``"drop"`` them (the default, as
            the tutorial), ``"pad"`` the last block to ``block_size`` (``pad_id`` required; label -100,
            attention 0), or ``"keep"`` it short.
        separator: a token id (e.g. EOS) appended after every document, or None.
        stride: distance between block starts; smaller than ``block_size`` gives overlapping evaluation
            windows whose overlap is context only (label -100), as in HF's strided perplexity.
        group_size: chunk each group of this many documents on its own, dropping (or padding / keeping)
            each group's remainder: ``group_size=1000`` gives exactly the blocks of the tutorial's
            ``group_texts`` under ``datasets.map(batched=True)``.
        pad_id: padding token id, needed when blocks can be shorter than ``block_size``.
        break_mode: where blocks may end, as fairseq's TokenBlockDataset: ``"none"`` anywhere in the
            stream (the default; everything above), ``"complete"`` only at document ends, each block
            holding as many whole documents (with their separators) as fit, in order, or ``"eos"``: each
            non-empty document a block of its own (run_mlm's ``--line_by_line``). No document is cut
            unless it is longer than ``block_size``; then ``overlong`` decides.
        overlong: (``"complete"`` and ``"eos"`` only) a document longer than ``block_size`` is ``"split"``
            into ``block_size`` pieces (the default), ``"truncate"``\\ d to its first ``block_size`` tokens,
            or kept whole in a block of its own (``"keep"``, fairseq's behaviour): the index's
            ``block_size``, the width of the rows ``gather`` returns, is then the longest such document.
    """
    tokens = _check_tokens(tokens)
    offsets = _check_offsets(offsets, tokens.shape[0])
    block_size = _check_positive("block_size", block_size)
    _check_choice("break_mode", break_mode, BREAK_MODES)
    if break_mode != "none":
        return _pack_whole_documents(tokens, offsets, block_size, break_mode, overlong, separator, pad_id,
                                     remainder=remainder, stride=stride, group_size=group_size)
    if overlong is not None:
        raise ValueError('overlong applies to break_mode="complete" or "eos" (with "none" blocks cut documents '
                         'anywhere)')
    remainder = "drop" if remainder is None else remainder
    _check_choice("remainder", remainder, REMAINDER_MODES)
    if remainder == "pad" and pad_id is None:
        raise ValueError('remainder="pad" needs a pad_id (e.g. the tokenizer\'s pad or eos id)')
    separator = _check_token_id("separator", separator)
    pad_id = _check_token_id("pad_id", pad_id)
    stride = block_size if stride is None else _check_positive("stride", stride)
    if stride > block_size:
        raise ValueError(f"stride ({stride}) must not exceed block_size ({block_size}): tokens would be skipped")
    has_sep = int(separator is not None)
    keep_partial = remainder != "drop"

    if group_size is not None:
        group_size = _check_positive("group_size", group_size)
        if stride != block_size:
            raise ValueError("stride and group_size cannot be combined")
        n_blocks = _k.count_group_blocks(offsets, block_size, group_size, has_sep, keep_partial)
        starts = np.empty(n_blocks, dtype=np.int64)
        lengths = np.empty(n_blocks, dtype=np.int64)
        _k.fill_group_blocks(offsets, block_size, group_size, has_sep, keep_partial, starts, lengths)
        context = np.zeros(n_blocks, dtype=np.int64)
    else:
        starts, lengths, context = _stream_windows(_stream_length(offsets, has_sep), block_size, stride, keep_partial)
    return BlockIndex(tokens, offsets, block_size, starts, lengths, context, separator, pad_id)


def _pack_whole_documents(tokens, offsets, block_size, break_mode, overlong, separator, pad_id, **cut_options):
    """pack_blocks' "complete" and "eos" modes: blocks are runs of whole documents in the stream."""
    given = [name for name, value in cut_options.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} applies to break_mode=\"none\" only: with break_mode={break_mode!r} "
                         "blocks end where documents end")
    separator = _check_token_id("separator", separator)
    pad_id = _check_token_id("pad_id", pad_id)
    overlong = _check_choice("overlong", "split" if overlong is None else overlong, OVERLONG_MODES)
    has_sep = int(separator is not None)
    # Document i with its separator, in stream positions.
    stream_offsets = offsets - offsets[0] + np.arange(offsets.shape[0], dtype=np.int64) * has_sep
    piece_starts, piece_lengths = _pieces(stream_offsets, block_size, overlong)
    piece_block, n_blocks = _assign_blocks(piece_lengths, block_size, break_mode)
    # Pieces of a block are consecutive in the stream (a truncated or kept overlong piece fills its block alone).
    first = np.flatnonzero(np.diff(piece_block, prepend=-1))
    starts = np.ascontiguousarray(piece_starts[first])
    lengths = np.add.reduceat(piece_lengths, first) if n_blocks else np.zeros(0, dtype=np.int64)
    width = _width(block_size, piece_lengths, overlong)
    return BlockIndex(tokens, offsets, width, starts, lengths.astype(np.int64), np.zeros(n_blocks, dtype=np.int64),
                      separator, pad_id)


def _pieces(offsets, block_size, overlong):
    """(starts, lengths) of the non-empty documents delimited by ``offsets``, overlong ones split, truncated
    or kept whole."""
    if overlong == "keep":
        lengths = np.diff(offsets)
        non_empty = lengths > 0
        return np.ascontiguousarray(offsets[:-1][non_empty]), np.ascontiguousarray(lengths[non_empty])
    split = overlong == "split"
    n_pieces = _k.count_pieces(offsets, block_size, split)
    starts = np.empty(n_pieces, dtype=np.int64)
    lengths = np.empty(n_pieces, dtype=np.int64)
    _k.fill_pieces(offsets, block_size, split, starts, lengths)
    return starts, lengths


def _assign_blocks(piece_lengths, block_size, mode):
    """(block of each piece, block count): best-fit decreasing, in order (fairseq's "complete"), or one
    piece per block ("eos")."""
    piece_block = np.empty(piece_lengths.shape[0], dtype=np.int64)
    if mode == "eos":
        piece_block[:] = np.arange(piece_lengths.shape[0])
        return piece_block, piece_lengths.shape[0]
    if mode == "complete":
        return piece_block, _k.next_fit(piece_lengths, block_size, piece_block)
    return piece_block, _k.best_fit_decreasing(piece_lengths, block_size, piece_block)


def _width(block_size, piece_lengths, overlong):
    """Rows are block_size wide, or as wide as the longest document kept whole."""
    if overlong == "keep" and piece_lengths.size:
        return max(block_size, int(piece_lengths.max()))
    return block_size


def _stream_length(offsets, has_separator):
    """Tokens in the concatenated documents, with one separator after each when there is one."""
    return int(offsets[-1] - offsets[0]) + int(has_separator) * (offsets.shape[0] - 1)


def _stream_windows(stream_len, block_size, stride, keep_partial):
    """Window starts k * stride; with keep_partial, windows continue until the stream is covered."""
    if stream_len >= block_size:
        n_full = (stream_len - block_size) // stride + 1
    else:
        n_full = 0
    last_end = (n_full - 1) * stride + block_size if n_full else 0
    n_blocks = n_full + int(keep_partial and last_end < stream_len)
    starts = np.arange(n_blocks, dtype=np.int64) * stride
    lengths = np.minimum(stream_len - starts, block_size)
    # Each window scores only what the previous one did not: its overlap is context.
    previous_end = np.concatenate(([0], starts[:-1] + lengths[:-1]))
    context = np.maximum(previous_end - starts, 0)
    return starts, lengths, context


# --- pack_documents -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PackedDocuments:
    """Documents packed whole into blocks: block b holds segments block_offsets[b]:block_offsets[b + 1].

    Segment s is ``tokens[seg_starts[s]:seg_starts[s] + seg_lengths[s]]``: a whole document, or a
    ``block_size`` piece of an overlong one. ``columns`` holds other per-token arrays packed alike.
    """

    tokens: np.ndarray
    block_size: int
    block_offsets: np.ndarray
    seg_starts: np.ndarray
    seg_lengths: np.ndarray
    pad_id: int
    n_dropped: int
    columns: dict | None = None

    def __post_init__(self):
        # The kernels run without bounds checks, so a layout built or edited by hand is checked here.
        _check_tokens(self.tokens)
        _check_positive("block_size", self.block_size)
        _check_token_id("pad_id", self.pad_id, optional=False)
        n_segments = _check_layout_array("seg_starts", self.seg_starts)
        _check_layout_array("seg_lengths", self.seg_lengths, n_segments)
        n_blocks = _check_layout_array("block_offsets", self.block_offsets) - 1
        bounds = self.block_offsets
        if n_blocks < 0 or bounds[0] != 0 or bounds[-1] != n_segments or np.any(bounds[1:] < bounds[:-1]):
            raise ValueError("block_offsets must run from 0 to the segment count without decreasing")
        if n_segments and (self.seg_starts.min() < 0 or self.seg_lengths.min() < 0
                           or np.any(self.seg_starts + self.seg_lengths > self.tokens.shape[0])):
            raise ValueError("segments must lie inside tokens")
        filled = np.concatenate(([0], np.cumsum(self.seg_lengths)))
        if n_blocks and np.any(filled[bounds[1:]] - filled[bounds[:-1]] > self.block_size):
            raise ValueError(f"a block holds more than block_size ({self.block_size}) tokens")
        _check_columns(self.columns, self.tokens.shape[0])

    def __len__(self):
        return self.block_offsets.shape[0] - 1

    @property
    def n_tokens(self):
        return int(self.seg_lengths.sum())

    @property
    def fill_rate(self):
        return self.n_tokens / (len(self) * self.block_size) if len(self) else 0.0

    def gather(self, indices, out=None, flatten=False):
        """Materialise blocks ``indices``.

        Returns int64 (k, block_size) ``input_ids``, ``labels`` (-100 at each document start and on
        padding), ``attention_mask`` and ``position_ids`` (restarting per document). With
        ``flatten=True``, returns the padding-free layout of transformers' ``DataCollatorWithFlattening``
        instead: (1, total) rows plus ``cu_seq_lens_q/k`` and ``max_length_q/k`` for flash-attention varlen
        and ``seq_idx`` (the sequence of each token). The ``columns`` come back under their names, int64,
        padded with 0 (given ``labels`` with -100, at each document start too, as the derived ones).
        """
        indices = _check_indices(indices, len(self))
        batch = _batch_arrays(
            indices.shape[0], self.block_size, ("input_ids", "labels", "attention_mask", "position_ids"), out
        )
        _k.gather_packed(
            self.tokens, self.block_offsets, self.seg_starts, self.seg_lengths, indices, self.pad_id,
            batch["input_ids"], batch["labels"], batch["attention_mask"], batch["position_ids"],
        )
        columns = self._gather_columns(indices, batch) if self.columns else {}
        if flatten:
            return _flatten(batch, columns)
        batch.update(columns)
        return batch

    def _gather_columns(self, indices, batch):
        """The given columns laid out as the blocks' tokens are (any integer dtype, so numpy, not the kernel)."""
        first, last = self.block_offsets[indices], self.block_offsets[indices + 1]
        segments = _concatenated_ranges(first, last - first)
        sources = _concatenated_ranges(self.seg_starts[segments], self.seg_lengths[segments])
        real = batch["attention_mask"] == 1
        gathered = {}
        for name, column in self.columns.items():
            fill = IGNORE_INDEX if name == "labels" else 0
            values = np.full(real.shape, fill, dtype=np.int64)
            values[real] = column[sources]
            if name == "labels":
                values[real & (batch["position_ids"] == 0)] = IGNORE_INDEX
            gathered[name] = values
        return gathered


def _concatenated_ranges(starts, lengths):
    """starts[0]..starts[0]+lengths[0]-1, then starts[1].., as one int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(int(lengths.sum()))


def _check_columns(columns, n_tokens):
    if columns is None:
        return None
    if not isinstance(columns, dict):
        raise TypeError(f"columns must be a dict of name -> per-token array, got {type(columns).__name__}")
    for name, column in columns.items():
        if name in ("input_ids", "position_ids"):
            raise ValueError(f"column {name!r} is derived from tokens; pass the other columns only")
        if not isinstance(column, np.ndarray) or column.ndim != 1 or column.dtype.kind not in "biu":
            raise TypeError(f"column {name!r} must be a 1-D integer or boolean numpy array")
        if column.shape[0] != n_tokens:
            raise ValueError(f"column {name!r} has {column.shape[0]} entries, tokens {n_tokens}: they must align")
    return columns


def _flatten(batch, columns=None):
    keep = batch["attention_mask"].astype(bool)
    merged = {**batch, **(columns or {})}
    flat = {key: merged[key][keep][None, :] for key in ("input_ids", "labels", "position_ids", *(columns or {}))}
    starts = np.flatnonzero(flat["position_ids"][0] == 0)
    cu_seq_lens = np.append(starts, flat["input_ids"].shape[1]).astype(np.int32)
    max_length = int(np.diff(cu_seq_lens).max()) if cu_seq_lens.size > 1 else 0
    # Which sequence each token belongs to (int32, as HF's return_seq_idx and mamba kernels expect).
    seq_idx = (np.cumsum(flat["position_ids"][0] == 0) - 1).astype(np.int32)[None, :]
    flat.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                max_length_q=max_length, max_length_k=max_length, seq_idx=seq_idx)
    return flat


def pack_documents(tokens, offsets, block_size, *, overlong="split", pad_id=0, columns=None, break_mode="best_fit"):
    """Pack whole documents into ``block_size`` blocks by best-fit decreasing (or in order, or one per block).

    Within a block, documents keep their input order (TRL's bfd keeps the order it placed them in).
    Empty documents are skipped.

    Args:
        overlong: documents longer than a block are ``"split"`` into ``block_size`` pieces (no token
            lost) or ``"truncate"``\\ d to their first ``block_size`` tokens (``n_dropped`` counts the rest);
            with ``break_mode="complete"`` or ``"eos"`` also kept whole (``"keep"``) in a block of their own,
            the rows then as wide as the longest one (``block_size`` of the result).
        break_mode: ``"best_fit"`` (best-fit decreasing: the fewest blocks), ``"complete"`` (fairseq's mode:
            documents in input order, each block taking the next ones while they fit) or ``"eos"`` (one
            document per block: run_mlm's ``--line_by_line`` with ``overlong="truncate"``).
        pad_id: fills the unused tail of each block (label -100, attention 0).
        columns: other per-token arrays aligned with ``tokens`` (``{"attention_mask": ..., "labels": ...}``),
            packed the same way, as TRL's ``pack_dataset`` packs every column of a dataset.
    """
    tokens = _check_tokens(tokens)
    offsets = _check_offsets(offsets, tokens.shape[0])
    block_size = _check_positive("block_size", block_size)
    _check_choice("break_mode", break_mode, PACKING_MODES)
    _check_choice("overlong", overlong, OVERLONG_MODES)
    if overlong == "keep" and break_mode == "best_fit":
        raise ValueError('overlong="keep" needs break_mode="complete" or "eos" (best fit packs into block_size)')
    pad_id = _check_token_id("pad_id", pad_id, optional=False)

    piece_starts, piece_lengths = _pieces(offsets, block_size, overlong)
    piece_block, n_blocks = _assign_blocks(piece_lengths, block_size, break_mode)

    # Group the pieces by block; a stable sort keeps each block's pieces in input order.
    order = np.argsort(piece_block, kind="stable")
    block_offsets = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(piece_block, minlength=n_blocks), out=block_offsets[1:])
    n_dropped = int(offsets[-1] - offsets[0]) - int(piece_lengths.sum())
    return PackedDocuments(
        tokens, _width(block_size, piece_lengths, overlong), block_offsets, piece_starts[order], piece_lengths[order],
        pad_id, n_dropped, _check_columns(columns, tokens.shape[0]),
    )


# --- group_texts: the datasets.map drop-in ------------------------------------------------------------

def group_texts(examples, block_size=128):
    """Drop-in for the tutorial's ``group_texts`` in ``dataset.map(group_texts, batched=True)``.

    Concatenates every column of the batch, drops the remainder that does not fill a block, cuts
    ``block_size`` blocks, and adds ``labels`` (a copy of ``input_ids``): the same blocks as the tutorial's
    function on the same batch. Columns come back as (n_blocks, block_size) numpy arrays, which
    ``datasets.map`` stores as it stores lists. A ``pyarrow.Table`` batch (``Dataset.with_format("arrow")``)
    gives a ``pyarrow.Table`` back, built from the list offsets and values without Python objects.

    Nothing is coerced: non-integer ids (a float would be truncated) are a TypeError; missing rows or ids
    (None, Arrow nulls) and a row whose length differs from its ``input_ids`` row (its tokens would be
    paired with another row's) are a ValueError naming the column and the row.
    """
    block_size = _check_positive("block_size", block_size)
    if block_size >= 2**60:
        # numpy refuses even an empty (0, block_size) int64 array past this size.
        raise ValueError(f"block_size must be below 2**60 (the widest numpy int64 row), got {block_size}")
    import sys

    if "pyarrow" in sys.modules:
        import pyarrow as pa

        if isinstance(examples, pa.Table):
            return _group_arrow_table(examples, block_size)
        # datasets' lazy batch still holds the Arrow table: skip the Arrow -> Python lists round trip.
        table = getattr(examples, "pa_table", None)
        untouched = getattr(examples, "keys_to_format", None)
        if isinstance(table, pa.Table) and untouched is not None and set(untouched) == set(examples.keys()):
            columns = {}
            for name in table.column_names:
                values, lengths = _arrow_rows(table, name)
                columns[name] = values.to_numpy(zero_copy_only=False), lengths
            return _blocks_with_labels(columns, block_size)

    return _blocks_with_labels({key: _flatten_rows(key, rows) for key, rows in examples.items()}, block_size)


def _check_rows_line_up(row_lengths):
    """Each column is concatenated on its own, so a row of another length than its input_ids row would
    shift every later token against input_ids even when the totals agree."""
    if "input_ids" not in row_lengths:
        raise KeyError("group_texts needs an 'input_ids' column")
    expected = row_lengths["input_ids"]
    for name, lengths in row_lengths.items():
        if lengths.shape != expected.shape:
            raise ValueError(f"column {name!r} has {lengths.shape[0]} rows but input_ids has {expected.shape[0]}")
        if not np.array_equal(lengths, expected):
            row = int(np.argmax(lengths != expected))
            raise ValueError(
                f"column {name!r} row {row} holds {lengths[row]} ids but its input_ids row holds {expected[row]}"
            )


def _blocks_with_labels(columns, block_size):
    """columns: name -> (flat ids, ids per row)."""
    _check_rows_line_up({name: lengths for name, (_, lengths) in columns.items()})
    n_blocks = columns["input_ids"][0].shape[0] // block_size
    result = {name: flat[: n_blocks * block_size].reshape(n_blocks, block_size) for name, (flat, _) in columns.items()}
    # int64 labels, as datasets stores the tutorial's (it narrows only the columns it knows, like input_ids).
    result["labels"] = result["input_ids"].astype(np.int64)
    return result


def _flatten_rows(key, rows):
    """(flat ids, ids per row) of a batch column: a list of id lists, or a 2-D integer array."""
    if isinstance(rows, np.ndarray) and rows.dtype != object:
        if rows.dtype.kind not in "iu":
            raise TypeError(
                f"column {key!r} has dtype {rows.dtype}; token ids must be integers (a float id would be truncated)"
            )
        if rows.ndim != 2:
            raise TypeError(f"column {key!r} must be a 2-D array (rows of ids), got shape {rows.shape}")
        if rows.dtype == np.uint64 and rows.size and rows.max() >= _INT64_LIMIT:
            raise ValueError(f"column {key!r} holds id {rows.max()}, beyond int64")
        return rows.reshape(-1), np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
    try:
        rows = list(rows)
    except TypeError:
        raise TypeError(f"column {key!r} must be a list of rows of token ids, got a {type(rows).__name__}") from None
    for r, row in enumerate(rows):
        if type(row) is list:
            continue
        if row is None:
            raise ValueError(f"column {key!r} row {r} is None (a missing row): drop or fill missing rows first")
        try:
            rows[r] = list(row)
        except TypeError:
            raise TypeError(f"column {key!r} row {r} is a {type(row).__name__}, expected a list of token ids") from None
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    dest = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lengths[:-1], out=dest[1:])
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    try:
        _lists.copy_int_lists(rows, flat, dest)
    except (TypeError, ValueError) as error:
        raise type(error)(f"column {key!r} {error}") from None
    return flat, lengths


def _arrow_rows(table, name):
    """(flat ids, ids per row) of a list column, refusing what the conversion would coerce: nulls
    (NaN or INT64_MIN once in numpy) and non-integer ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"column {name!r} has type {column.type}; group_texts needs lists of token ids")
    if column.null_count:
        row = pc.index(column.is_null(), True).as_py()
        raise ValueError(f"column {name!r} row {row} is null (a missing row): drop or fill missing rows first")
    values = column.flatten()
    if not pa.types.is_integer(values.type):
        raise TypeError(
            f"column {name!r} holds {values.type} ids; token ids must be integers (a float id would be truncated)"
        )
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    if values.null_count:
        first = pc.index(values.is_null(), True).as_py()
        row = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        raise ValueError(f"column {name!r} row {row} holds a null id (a missing value)")
    if pa.types.is_uint64(values.type) and len(values) and pc.max(values).as_py() >= _INT64_LIMIT:
        raise ValueError(f"column {name!r} holds id {pc.max(values).as_py()}, beyond int64")
    return values, lengths


def _group_arrow_table(table, block_size):
    import pyarrow as pa

    columns = {name: _arrow_rows(table, name) for name in table.column_names}
    _check_rows_line_up({name: lengths for name, (_, lengths) in columns.items()})
    n_blocks = len(columns["input_ids"][0]) // block_size
    offsets = pa.array(np.arange(n_blocks + 1, dtype=np.int64) * block_size, type=pa.int32())
    result = {name: pa.ListArray.from_arrays(offsets, values.slice(0, n_blocks * block_size))
              for name, (values, _) in columns.items()}
    input_ids = columns["input_ids"][0].slice(0, n_blocks * block_size)
    result["labels"] = pa.ListArray.from_arrays(offsets, input_ids.cast(pa.int64()))
    return pa.table(result)
