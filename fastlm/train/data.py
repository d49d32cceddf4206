"""The run's data plan: the documents of every store, held-out evaluation documents, and their packing into
blocks (training sources into a Mixture, evaluation sets into EvalSets); the MLM masker.

The data section of the run's configuration (config.DataConfig) says how.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np

from fastlm import pack_blocks, pack_documents
from fastlm.masking import Masker
from fastlm.packing import BlockIndex
from fastlm.tokenizer import padding_id, special_ids
from fastlm.train.errors import ConfigError
from fastlm.train.sampling import Mixture, TrainSource
from fastlm.train.stores import content_id

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


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set: its packed blocks, and the tokens and UTF-8 bytes (None: not recorded) of the
    documents they hold, which turn a mean token loss into bits per byte."""
    name: str
    blocks: object
    n_tokens: int
    n_bytes: int = None


def plan(data, stores, tokenizer, *, do_train, do_eval):
    """(training Mixture, or None when the run does not train; [EvalSet], empty when it does not
    evaluate): every store packed into blocks, --max_train_samples / --max_eval_samples blocks at most.
    Without an evaluation set, --validation_split_percentage holds out the last documents of each
    training source as a set of its own (named "validation" for a single source, else after the source)."""
    train = [(source, content_id(store), Documents.of(store)) for source, store in stores.train]
    evals = [(source.name, Documents.of(store)) for source, store in stores.eval]
    percent = data.validation_split_percentage
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
    if do_train:
        mixture = Mixture([TrainSource(source.name, first_blocks(pack(data, docs.tokens, docs.offsets, tokenizer),
                                                                 data.max_train_samples), source.weight, content)
                           for source, content, docs in train])
    eval_sets = []
    for name, docs in evals if do_eval else ():
        blocks = first_blocks(pack(data, docs.tokens, docs.offsets, tokenizer, stride=data.eval_stride),
                              data.max_eval_samples)
        if len(blocks) == 0:
            raise ConfigError(f"the evaluation set {name} is shorter than one block of {data.block_size} tokens")
        eval_sets.append(EvalSet(name, blocks, docs.n_tokens, docs.n_bytes))
    if do_eval and not do_train and not eval_sets:
        raise ConfigError("--do_eval alone evaluates a model: give an evaluation set (--validation_file, "
                          "--eval_store, or a training source with --validation_split_percentage)")
    return mixture, eval_sets


def pack(data, tokens, offsets, tokenizer, *, stride=None):
    pad_id = padding_id(special_ids(tokenizer))
    if data.line_by_line:  # run_mlm's --line_by_line: each non-empty document alone in a block, truncated
        return pack_documents(tokens, offsets, data.block_size, break_mode="eos", overlong="truncate", pad_id=pad_id)
    if data.packing == "documents" and not stride:
        return pack_documents(tokens, offsets, data.block_size, pad_id=pad_id)
    separator = tokenizer.eos_token_id if data.separator == "eos" else None
    if data.separator == "eos" and separator is None:
        raise ConfigError("--separator eos: the tokenizer has no EOS token")
    # Strided evaluation keeps the final partial window so every token is scored, as HF's recipe does.
    remainder = "pad" if stride else "drop"
    return pack_blocks(tokens, offsets, data.block_size, separator=separator, stride=stride,
                       remainder=remainder, pad_id=pad_id)


def first_blocks(blocks, n):
    """The first n blocks, in packing order: run_clm.py's --max_train_samples / --max_eval_samples select
    them this way, before any shuffling."""
    if n is None or n >= len(blocks):
        return blocks
    if isinstance(blocks, BlockIndex):
        return dataclasses.replace(blocks, starts=blocks.starts[:n], lengths=blocks.lengths[:n],
                                   context=blocks.context[:n])
    cut = int(blocks.block_offsets[n])
    return dataclasses.replace(blocks, block_offsets=blocks.block_offsets[:n + 1], seg_starts=blocks.seg_starts[:cut],
                               seg_lengths=blocks.seg_lengths[:cut])


def make_masker(data, tokenizer):
    if tokenizer.mask_token_id is None:
        raise ConfigError("--task mlm needs a tokenizer with a mask token")
    return Masker.from_tokenizer(tokenizer, mlm_probability=data.mlm_probability, seed=data.seed)
