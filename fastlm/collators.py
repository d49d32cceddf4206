"""Data collators for ``transformers.Trainer`` and plain DataLoaders.

- :class:`DataCollatorForMLM`: a drop-in for ``DataCollatorForLanguageModeling(tokenizer,
  mlm_probability=0.15)``: same input features, same output keys and dtypes, same padding, masks from the
  fastlm kernel (reproducible per batch, see :mod:`fastlm.masking`).
- :class:`DataCollatorForCLM`: labels = input_ids (-100 on padding, by attention mask, so an EOS used as
  pad keeps its labels), or padding-free batches with ``position_ids`` restarting per example (the layout
  of ``DataCollatorWithFlattening``), built by :func:`fastlm.packing.pack_documents`.
"""
import os
import sys
from collections.abc import Mapping

import numpy as np

from fastlm._kernels import load
from fastlm.masking import IGNORE_INDEX, Masker

_lists = load("_lists")

RETURN_TENSORS = ("pt", "np")
# Features HF's collators drop before the model sees the batch.
_DROPPED_KEYS = ("special_tokens_mask", "offset_mapping", "length")


def _check_return_tensors(return_tensors):
    if return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    return return_tensors


def _to_tensors(batch, return_tensors):
    if return_tensors == "np":
        return batch
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _padded_length(lengths, pad_to_multiple_of):
    longest = max(lengths) if lengths else 0
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _padding_mask(lengths, width, padding_side):
    """1 on each row's real tokens, 0 on its padding."""
    columns = np.arange(width)
    lengths = np.asarray(lengths, dtype=np.int64)[:, None]
    real = columns < lengths if padding_side == "right" else columns >= width - lengths
    return real.astype(np.int64)


def _pad_column(name, rows, lengths, width, fill, padding_side):
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if len(row) != n:
            raise ValueError(f"feature {name!r} of example {i} has {len(row)} entries but its input_ids has {n}")
    out = np.full((len(rows), width), fill, dtype=np.int64)
    if all(type(row) is list for row in rows):
        # Row i starts at column 0, or (left padding) where its right end meets the last column.
        dest = np.arange(len(rows), dtype=np.int64) * width
        if padding_side == "left":
            dest += width - np.asarray(lengths, dtype=np.int64)
        try:
            _lists.copy_int_lists(rows, out.reshape(-1), dest)
        except TypeError as error:
            raise TypeError(f"feature {name!r} must hold integer ids: {error}") from None
        return out
    # Arrays or tensors (a dataset with a numpy / torch format): numpy converts them row by row.
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if n:
            if padding_side == "right":
                out[i, :n] = row
            else:
                out[i, width - n:] = row
    return out


def pad_features(features, *, pad_id, pad_to_multiple_of=None, padding_side="right", pad_token_type_id=0):
    """Stack HF-style features (dicts of id lists, or bare id lists) into int64 arrays, padding like
    ``tokenizer.pad``: input_ids with ``pad_id``, attention_mask 0 (added when missing), special_tokens_mask 1,
    token_type_ids ``pad_token_type_id``, labels -100."""
    if not features:
        raise ValueError("cannot collate an empty list of features")
    if not isinstance(features[0], Mapping):
        features = [{"input_ids": f} for f in features]
        with_attention = False
    else:
        with_attention = True
    if "input_ids" not in features[0]:
        raise KeyError("features need an 'input_ids' entry")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(f["input_ids"]) for f in features]
    width = _padded_length(lengths, pad_to_multiple_of)
    if pad_id is None and any(n != width for n in lengths):
        raise ValueError("the examples have different lengths but the tokenizer has no pad token: set one "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token) or pass pad_id")
    # Without a pad id nothing gets padded (checked above); 0 only fills np.full.
    fills = {"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0, "special_tokens_mask": 1,
             "token_type_ids": pad_token_type_id, "labels": IGNORE_INDEX}
    batch = {}
    for key in features[0]:
        if key == "offset_mapping":
            continue
        rows = [f[key] for f in features]
        if key in fills or (not np.isscalar(rows[0]) and len(rows[0]) == lengths[0]):
            batch[key] = _pad_column(key, rows, lengths, width, fills.get(key, 0), padding_side)
        else:
            batch[key] = np.asarray(rows)
    if with_attention and "attention_mask" not in batch:
        batch["attention_mask"] = _padding_mask(lengths, width, padding_side)
    return batch


class DataCollatorForMLM:
    """Drop-in for ``DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)`` in a Trainer.

    Same features in (dicts with ``input_ids`` and optionally ``attention_mask``, ``token_type_ids``,
    ``special_tokens_mask``, ``offset_mapping``; or bare id lists), same keys and int64 tensors out, padded
    like HF. Differences: random replacements are drawn from the non-special ids; ``whole_word_mask``
    works for WordPiece and byte-level BPE from a vocabulary table (no offsets needed) and keeps the
    80/10/10 replacement (HF forces 100% mask); masks are reproducible per batch.

    Reproducibility: batch k of an epoch is masked with the stream keyed by (seed, epoch, k), whatever
    the number of DataLoader workers (worker w of n handles batches w, w + n, ...: map-style datasets, in
    order). With ranks, rank r's j-th batch is global batch j * world_size + r (rank and world size from
    the arguments or torch.distributed), so ranks never share a stream. Call ``set_epoch(epoch)`` before
    each epoch's iterator is created (as with ``DistributedSampler``), or pass ``trainer_callback()`` to
    the Trainer (its ``on_epoch_begin`` runs before the epoch's workers start): new masks per epoch, the
    same for any worker count. Without it, worker processes (re-created each epoch) restart at batch 0
    while the main process keeps counting. A resumed Trainer skips batches without collating them, so the
    numbering restarts there. With ``fixed=True`` each row
    is masked from its own tokens (:meth:`fastlm.masking.Masker.mask_fixed`): use it for evaluation sets.

    Args:
        tokenizer: a transformers tokenizer with a mask token.
        mlm_probability, mask_replace_prob, random_replace_prob: as in transformers 5.
        whole_word_mask: mask whole words (scheme detected from the vocabulary), or "wordpiece" / "bpe".
        exact, span: exact-count or SpanBERT span masking (see :class:`fastlm.masking.Masker`).
        pad_to_multiple_of, return_tensors: as in transformers ("pt" or "np").
        seed: stream seed; None draws one from the OS once (so every worker shares it).
        fixed: per-row evaluation masks.
        rank, world_size: this process's place among the training processes (default: torch.distributed's
            when initialised, else 0 of 1).
    """

    def __init__(self, tokenizer, mlm_probability=0.15, *, mask_replace_prob=0.8, random_replace_prob=0.1,
                 whole_word_mask=False, exact=False, span=None, pad_to_multiple_of=None, return_tensors="pt",
                 seed=None, fixed=False, rank=None, world_size=None):
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("no mask id: this tokenizer has no mask token, which masked-LM training needs; "
                             "use DataCollatorForCLM for causal LM")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        self.masker = Masker.from_tokenizer(
            tokenizer, whole_word=whole_word_mask or None, mlm_probability=mlm_probability,
            mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob, exact=exact, span=span,
            seed=seed,
        )
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.pad_token_type_id = getattr(tokenizer, "pad_token_type_id", 0)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = _check_return_tensors(return_tensors)
        self.fixed = bool(fixed)
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._calls = 0
        self._pid = os.getpid()

    def set_epoch(self, epoch):
        """Start numbering batches for ``epoch`` (call before the epoch's DataLoader iterator is created)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)
        self._calls = 0

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that calls :meth:`set_epoch` at each epoch's start."""
        from transformers import TrainerCallback

        collator = self

        class SetMaskingEpoch(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                collator.set_epoch(int(round(state.epoch or 0)))

        return SetMaskingEpoch()

    def _next_batch_index(self):
        torch = sys.modules.get("torch")
        worker = torch.utils.data.get_worker_info() if torch is not None else None
        if self._pid != os.getpid():
            # A DataLoader worker's copy: it carries the parent's count, but its batches start at its id.
            self._pid, self._calls = os.getpid(), 0
        calls, self._calls = self._calls, self._calls + 1
        # DataLoader hands map-style batches to its workers round-robin, in order.
        local = calls if worker is None else calls * worker.num_workers + worker.id
        rank, world_size = self.rank, self.world_size
        if world_size is None:
            distributed = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        return local * world_size + rank

    def __call__(self, features):
        batch = pad_features(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                             padding_side=self.padding_side, pad_token_type_id=self.pad_token_type_id)
        special = batch.pop("special_tokens_mask", None)
        for key in _DROPPED_KEYS:
            batch.pop(key, None)
        # Targets: attended, non-special tokens (the tokenizer's specials by id, plus any the features mark).
        maskable = batch.get("attention_mask")
        if special is not None:
            maskable = (special == 0) if maskable is None else (maskable != 0) & (special == 0)
        if self.fixed:
            batch["input_ids"], batch["labels"] = self.masker.mask_fixed(batch["input_ids"], maskable)
        else:
            batch["input_ids"], batch["labels"] = self.masker(
                batch["input_ids"], maskable, epoch=self.epoch, batch_index=self._next_batch_index())
        return _to_tensors(batch, self.return_tensors)


class DataCollatorForCLM:
    """Causal-LM batches: ``labels`` = ``input_ids`` with -100 where attention is 0.

    Unlike ``DataCollatorForLanguageModeling(mlm=False)``, padding is found by the attention mask, not by
    the pad id, so EOS tokens keep their labels when pad == eos (transformers #23530).

    ``padding_free=True`` concatenates the examples into one (1, total) row with ``position_ids``
    restarting per example and label -100 at each example's first token (it would be predicted from the
    previous example), like ``DataCollatorWithFlattening`` (given ``labels`` features are used, first
    label of each example dropped); examples keep their input order. ``return_flash_attn_kwargs=True`` adds ``cu_seq_lens_q/k`` (int32) and
    ``max_length_q/k`` for flash-attention varlen kernels.
    """

    def __init__(self, tokenizer=None, *, pad_id=None, padding_free=False, return_flash_attn_kwargs=False,
                 pad_to_multiple_of=None, return_tensors="pt"):
        if pad_id is None and tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.padding_free = bool(padding_free)
        self.return_flash_attn_kwargs = bool(return_flash_attn_kwargs)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = _check_return_tensors(return_tensors)

    def __call__(self, features):
        if self.padding_free:
            return _to_tensors(self._flatten(features), self.return_tensors)
        batch = pad_features(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                             padding_side=self.padding_side)
        for key in _DROPPED_KEYS:
            batch.pop(key, None)
        labels = batch["input_ids"].copy()
        # Padding by position, not by pad id: an EOS used as pad keeps its labels where it is real.
        attention = batch.get("attention_mask")
        if attention is None:  # bare id lists carry no mask
            lengths = [len(f["input_ids"] if isinstance(f, Mapping) else f) for f in features]
            attention = _padding_mask(lengths, labels.shape[1], self.padding_side)
        labels[attention == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return _to_tensors(batch, self.return_tensors)

    def _flatten(self, features):
        from fastlm.packing import pack_documents

        if not features:
            raise ValueError("cannot collate an empty list of features")
        rows = [f["input_ids"] if isinstance(f, Mapping) else f for f in features]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        if total == 0:
            raise ValueError("every example is empty: nothing to collate")
        tokens = np.empty(total, dtype=np.int64)
        for row, start, n in zip(rows, offsets[:-1], lengths):
            tokens[start:start + n] = row
        # One block as long as the batch: every example fits whole, none is split.
        flat = pack_documents(tokens, offsets, total).gather([0], flatten=True)
        batch = {key: flat[key] for key in ("input_ids", "labels", "position_ids")}
        if all(isinstance(f, Mapping) and "labels" in f for f in features):
            # Given labels win (e.g. prompts masked for SFT), as in DataCollatorWithFlattening; each
            # example's first label still goes, since the previous example would predict it.
            given = [np.asarray(f["labels"], dtype=np.int64) for f in features]
            for i, (labels, n) in enumerate(zip(given, lengths)):
                if labels.shape != (n,):
                    raise ValueError(f"labels of example {i} have shape {labels.shape}, its input_ids {n} tokens")
            flat_labels = np.concatenate(given)
            flat_labels[offsets[:-1][lengths > 0]] = IGNORE_INDEX
            batch["labels"] = flat_labels[None, :]
        if self.return_flash_attn_kwargs:
            batch.update({key: flat[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        return batch
