"""Data collators for ``transformers.Trainer`` and plain DataLoaders, drop-ins for transformers' own.

- :class:`DataCollatorForMLM` (also exported as ``DataCollatorForLanguageModeling``): transformers'
  ``DataCollatorForLanguageModeling`` with the same constructor arguments (``mlm=False`` gives causal-LM
  batches), the same call and the same output keys, dtypes and padding; masks come from the fastlm kernel
  (:mod:`fastlm.masking`).
- :class:`DataCollatorForCLM`: causal-LM batches, labels = input_ids (-100 on padding, found by the attention
  mask, so an EOS used as pad keeps its labels), or ``padding_free=True``: transformers'
  ``DataCollatorWithFlattening`` (one (1, total) row, ``position_ids`` restarting per example).

Deliberate differences from transformers are listed in docs/collators.md ("Where fastlm differs").
"""
import os
import sys
from collections.abc import Mapping

import numpy as np

from fastlm._kernels import load
from fastlm._validation import check_flag, check_int_type, check_non_negative_int, check_positive_int, is_int
from fastlm.masking import Masker, word_scheme
from fastlm.packing import IGNORE_INDEX

_lists = load("_lists")

RETURN_TENSORS = ("pt", "np")
# Features the collators consume or that no model takes; transformers drops the first two as well.
_DROPPED_KEYS = ("special_tokens_mask", "offset_mapping", "word_ids", "length")
# Mixed into the streams drawn from the global RNG (seed=None), so they are not the keyed ones.
_GLOBAL_RNG_TAG = 0x676C6F62_616C726E


# --- validation ---------------------------------------------------------------------------------------

def _check_return_tensors(return_tensors):
    if return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    return return_tensors


def _check_multiple(pad_to_multiple_of):
    if pad_to_multiple_of is None:
        return None
    if not is_int(pad_to_multiple_of):
        raise TypeError(f"pad_to_multiple_of must be None or a positive int, got {pad_to_multiple_of!r}")
    return check_positive_int("pad_to_multiple_of", pad_to_multiple_of)


def _int_row(name, i, row):
    """Row ``i`` of feature ``name`` as a list or an integer ndarray; floats and nulls are refused, since
    writing them into int64 would truncate ids silently (a null in a row turns a numpy-formatted column
    into float NaN)."""
    if type(row) is list:
        return row  # the list copier refuses non-ints itself
    if row is None:
        raise TypeError(f"feature {name!r} of example {i} is None (a null row?); every row must hold token ids")
    if isinstance(row, tuple):
        return list(row)
    if type(row).__module__.startswith("torch"):
        row = row.detach().cpu().numpy()
    row = np.asarray(row)
    if row.dtype.kind not in "biu":
        raise TypeError(f"feature {name!r} of example {i} holds {row.dtype} values; token ids must be integers "
                        "(cast the column to int, and fill or drop null entries)")
    if row.ndim != 1:
        raise ValueError(f"feature {name!r} of example {i} must be 1-D, got shape {row.shape}")
    return row


def _copy_rows(name, rows, out, dest):
    """Write row r at flat position dest[r] of ``out`` (int64); rows come from :func:`_int_row`."""
    if all(type(row) is list for row in rows):
        try:
            _lists.copy_int_lists(rows, out, dest)
        except (TypeError, ValueError) as error:  # a non-int id / a missing (None) or too large one
            raise type(error)(f"feature {name!r} must hold integer ids: {error}") from None
        return
    for row, start in zip(rows, dest):
        if type(row) is list:
            _lists.copy_int_lists([row], out, np.array([start], dtype=np.int64))
        else:
            out[start:start + len(row)] = row


def _to_tensors(batch, return_tensors):
    if return_tensors == "np":
        return batch
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


# --- padding --------------------------------------------------------------------------------------------

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


def _row_starts(lengths, width, padding_side):
    """Flat position of each row's first token in a (len(lengths), width) array."""
    dest = np.arange(len(lengths), dtype=np.int64) * width
    if padding_side == "left":
        dest += width - np.asarray(lengths, dtype=np.int64)
    return dest


def _pad_column(name, rows, lengths, width, fill, padding_side):
    rows = [_int_row(name, i, row) for i, row in enumerate(rows)]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if len(row) != n:
            raise ValueError(f"feature {name!r} of example {i} has {len(row)} entries but its input_ids has {n}")
    out = np.full((len(rows), width), fill, dtype=np.int64)
    _copy_rows(name, rows, out.reshape(-1), _row_starts(lengths, width, padding_side))
    return out


def _pad_offsets(rows, lengths, width, padding_side):
    """offset_mapping rows ((start, end) per token) as a (B, width, 2) int64 array, padding (0, 0)."""
    out = np.zeros((len(rows), width, 2), dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row is None:
            raise TypeError(f"feature 'offset_mapping' of example {i} is None")
        if type(row).__module__.startswith("torch"):
            row = row.detach().cpu().numpy()
        row = np.asarray(row).reshape(-1, 2) if len(row) else np.zeros((0, 2), dtype=np.int64)
        if row.shape != (n, 2) or row.dtype.kind not in "iu":
            raise ValueError(f"feature 'offset_mapping' of example {i} must hold {n} (start, end) integer pairs")
        first = 0 if padding_side == "right" else width - n
        out[i, first:first + n] = row
    return out


def _pad_word_ids(rows, lengths, width, padding_side):
    """word_ids rows (None for tokens of no word, as BatchEncoding.word_ids() gives) as (B, width), -1 there."""
    rows = [[-1 if w is None else w for w in row] if isinstance(row, (list, tuple)) else row for row in rows]
    return _pad_column("word_ids", rows, lengths, width, -1, padding_side)


def _other_feature(name, rows, return_tensors):
    """A feature passed through unpadded (a score, a class label), stacked as transformers stacks it:
    ``np.asarray`` for "np", ``torch.tensor`` for "pt", so Python floats become torch's default float
    dtype (float32) there, as in transformers. Text is refused by name: no tensor holds it."""
    try:
        array = np.asarray(rows)
    except ValueError:
        raise ValueError(f"feature {name!r} has rows of different lengths and is not a token feature: give "
                         "every example the same shape, or drop it before collating") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"feature {name!r} holds {type(rows[0]).__name__} values (example 0: {rows[0]!r:.40}); a "
                        "batch holds numbers only: drop text columns before collating (dataset.remove_columns, "
                        "or the Trainer's remove_unused_columns=True)")
    if return_tensors == "pt" and isinstance(rows[0], (bool, int, float, list, tuple)):
        import torch

        return torch.tensor(rows)
    return array


def _is_token_row(row, n_tokens):
    """One integer per token (padded like input_ids), rather than a value passed through."""
    if row is None or np.isscalar(row) or len(row) != n_tokens:
        return False
    first = row[0] if n_tokens else 0
    return not isinstance(first, (float, np.floating, str, bytes)) and not getattr(first, "is_floating_point",
                                                                                   lambda: False)()


def pad_features(features, *, pad_id, pad_to_multiple_of=None, padding_side="right", pad_token_type_id=0, skip=(),
                 return_tensors="np"):
    """Stack HF-style features (dicts of id lists, arrays or tensors, or bare id lists) into int64 arrays,
    padding like ``tokenizer.pad``: input_ids with ``pad_id``, attention_mask 0 (added when missing),
    special_tokens_mask 1, token_type_ids ``pad_token_type_id``, labels -100; offset_mapping becomes
    (B, L, 2) and word_ids (B, L) with -1 for tokens of no word. Features named in ``skip`` are left out
    (reading a batch's offsets costs more than masking it). Other features (one value or one non-integer
    row per example) are stacked unpadded, as for ``return_tensors`` transformers stacks them."""
    pad_to_multiple_of = _check_multiple(pad_to_multiple_of)
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
    ids = [_int_row("input_ids", i, f["input_ids"]) for i, f in enumerate(features)]
    lengths = [len(row) for row in ids]
    width = _padded_length(lengths, pad_to_multiple_of)
    if pad_id is None and any(n != width for n in lengths):
        raise ValueError("the examples have different lengths but the tokenizer has no pad token: set one "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token) or pass pad_id")
    # Without a pad id nothing gets padded (checked above); 0 only fills np.full.
    fills = {"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0, "special_tokens_mask": 1,
             "token_type_ids": pad_token_type_id, "labels": IGNORE_INDEX}
    batch = {}
    for key in features[0]:
        if key in skip:
            continue
        rows = ids if key == "input_ids" else [f[key] for f in features]
        if key == "offset_mapping":
            batch[key] = _pad_offsets(rows, lengths, width, padding_side)
        elif key == "word_ids":
            batch[key] = _pad_word_ids(rows, lengths, width, padding_side)
        elif key in fills or _is_token_row(rows[0], lengths[0]):
            batch[key] = _pad_column(key, rows, lengths, width, fills.get(key, 0), padding_side)
        else:
            batch[key] = _other_feature(key, rows, return_tensors)
    if with_attention and "attention_mask" not in batch:
        batch["attention_mask"] = _padding_mask(lengths, width, padding_side)
    return batch


# --- causal LM --------------------------------------------------------------------------------------------

def _clm_pad_id(tokenizer):
    """Pad with the pad token, else EOS (labels follow the attention mask, so an EOS pad costs nothing)."""
    if tokenizer is None:
        return None
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(tokenizer, "eos_token_id", None)


def _causal_lm_batch(features, *, pad_id, pad_to_multiple_of, padding_side, return_tensors):
    batch = pad_features(features, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                         skip=_DROPPED_KEYS, return_tensors=return_tensors)
    labels = batch["input_ids"].copy()
    # Padding by position, not by pad id: an EOS used as pad keeps its labels where it is real.
    attention = batch.get("attention_mask")
    if attention is None:  # bare id lists carry no mask
        lengths = [len(f["input_ids"] if isinstance(f, Mapping) else f) for f in features]
        attention = _padding_mask(lengths, labels.shape[1], padding_side)
    labels[attention == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return batch


# --- whole words ------------------------------------------------------------------------------------------

def _word_starts_from_offsets(offsets):
    """transformers' rule: a token begins a word unless it starts where the previous token ended. (Tokens
    after a special token or padding also begin one: the kernel starts a unit after any unselectable token.)"""
    previous_end = np.full(offsets.shape[:2], -1, dtype=np.int64)
    previous_end[:, 1:] = offsets[:, :-1, 1]
    return offsets[..., 0] != previous_end


def _word_starts_from_word_ids(word_ids):
    previous = np.full(word_ids.shape, -1, dtype=np.int64)
    previous[:, 1:] = word_ids[:, :-1]
    return (word_ids != previous) | (word_ids < 0)


class DataCollatorForMLM:
    """Drop-in for transformers' ``DataCollatorForLanguageModeling``: same arguments, in the same order,
    same call (``collator(features, return_tensors=None)``), same output.

    Features are dicts with ``input_ids`` and optionally ``attention_mask``, ``token_type_ids``,
    ``special_tokens_mask``, ``offset_mapping``, ``word_ids`` (or bare id lists); lists, numpy arrays or
    tensors. Output: the padded features as int64 tensors (or arrays) plus ``labels``.

    Masking (``mlm=True``): each token is selected with probability ``mlm_probability`` unless it is special
    (by the features' ``special_tokens_mask`` when given, else by the tokenizer's special ids, as
    ``get_special_tokens_mask`` does) or padding; a selected token becomes a target and is replaced by the
    mask token (``mask_replace_prob``), a random id below ``len(tokenizer)`` (``random_replace_prob``) or
    kept. ``mlm=False``: causal-LM labels (see :class:`DataCollatorForCLM`).

    Whole words (``whole_word_mask=True``): word boundaries come from the features' ``word_ids`` when given;
    else from the vocabulary's word marks for byte-level BPE (``Ġ``) and SentencePiece (``▁``); else (WordPiece,
    whose ``##`` cannot tell "word," from "word ,", or a vocabulary with no marks) from ``offset_mapping``
    by transformers' rule. For byte-level BPE this gives RoBERTa the words transformers' offsets give it, and
    GPT-2 the same words, where transformers' offsets (which include the space before a word) make each
    GPT-2 row one word, masked whole or not at all. As in transformers every selected token becomes the
    mask token, unless ``mask_replace_prob`` / ``random_replace_prob`` are given.

    Random streams: with ``seed=None`` each batch draws its stream key from torch's global RNG (numpy's for
    ``return_tensors="np"``), the RNG transformers' collator uses, so ``transformers.set_seed`` reproduces
    the masks and every epoch gets new ones. With ``seed=s`` batch k of epoch e is masked from
    ``PCG64([k, e, s])``: the collator numbers its batches itself (DataLoader workers take batches
    round-robin; rank r of n takes global batch j * n + r), so masks do not depend on torch's RNG. Without
    ``set_epoch`` / :meth:`trainer_callback` the numbering runs on across epochs (one process), and
    worker processes, which restart each epoch, number the epochs by DataLoader iterator; then the first
    epoch's masks are the same with 0, 1 or 2 workers and later epochs get new ones. Call ``set_epoch(e)``
    before each epoch (or pass ``callbacks=[collator.trainer_callback()]`` to the Trainer) to key every
    epoch by its number: the same masks for any worker count (persistent workers keep the epoch they
    started with and number on).

    fastlm options (keyword only): ``exact`` / ``span`` (see :class:`fastlm.masking.Masker`), ``fixed``
    (evaluation masks keyed by each example's tokens), ``random_ids="non_special"`` (draw random
    replacements from the vocabulary's non-special ids only), ``rank`` / ``world_size`` (default:
    torch.distributed's when initialised).
    """

    def __init__(self, tokenizer, mlm=True, whole_word_mask=False, mlm_probability=0.15, mask_replace_prob=None,
                 random_replace_prob=None, pad_to_multiple_of=None, return_tensors="pt", seed=None, *, exact=False,
                 span=None, fixed=False, random_ids="vocab", rank=None, world_size=None):
        self.tokenizer = tokenizer
        if not isinstance(mlm, (bool, np.bool_)):  # check_flag's words plus the positional-argument hint
            raise TypeError(f"mlm must be True or False, got {mlm!r}; the second positional argument is mlm, as in "
                            "transformers (pass mlm_probability= by keyword)")
        self.mlm = bool(mlm)
        if whole_word_mask not in (False, True, "wordpiece", "bpe", "sentencepiece"):
            raise ValueError(f"whole_word_mask must be True, False, 'wordpiece', 'bpe' or 'sentencepiece', "
                             f"got {whole_word_mask!r}")
        self.whole_word_mask = whole_word_mask
        if self.mlm and getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("no mask id: this tokenizer has no mask token, which masked-LM training needs; "
                             "pass mlm=False (or use DataCollatorForCLM) for causal LM")
        if not self.mlm and whole_word_mask:
            raise ValueError("whole_word_mask needs mlm=True")
        self.mlm_probability = mlm_probability
        # transformers masks every token of a selected word (no random or kept tokens) unless told otherwise.
        whole = bool(whole_word_mask)
        self.mask_replace_prob = (1.0 if whole else 0.8) if mask_replace_prob is None else mask_replace_prob
        self.random_replace_prob = (0.0 if whole else 0.1) if random_replace_prob is None else random_replace_prob
        self.pad_to_multiple_of = _check_multiple(pad_to_multiple_of)
        self.return_tensors = _check_return_tensors(return_tensors)
        # transformers' name and meaning: seed=None draws from the global RNG (see the class docstring).
        self.seed = None if seed is None else check_non_negative_int("seed", seed)
        self.exact, self.span, self.fixed, self.random_ids = exact, span, bool(fixed), random_ids
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not (is_int(world_size) and is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.rank, self.world_size = rank, world_size
        self.pad_id = getattr(tokenizer, "pad_token_id", None) if self.mlm else _clm_pad_id(tokenizer)
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.pad_token_type_id = getattr(tokenizer, "pad_token_type_id", 0)
        self.epoch = 0
        self._epoch_given = False
        self._calls = 0
        self._pid = os.getpid()
        self._iterators = _IteratorCount()
        self._global_stream = np.random.PCG64(0)  # its state is set from the global RNG at every batch
        self._masker_settings = None
        if self.mlm:
            self._sync_masker()  # validates the masking arguments now rather than at the first batch

    # --- epochs and streams ---------------------------------------------------------------------------

    def set_epoch(self, epoch):
        """Key the next batches by ``epoch``, numbered from 0 (call before the epoch's DataLoader iterator
        is created, as with ``DistributedSampler``)."""
        self.epoch = check_non_negative_int("epoch", epoch)
        self._epoch_given = True
        self._calls = 0

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that calls :meth:`set_epoch` at each epoch's start."""
        from transformers import TrainerCallback

        collator = self

        class SetMaskingEpoch(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                collator.set_epoch(int(round(state.epoch or 0)))

        return SetMaskingEpoch()

    def _bit_generator(self, return_tensors):
        if self.seed is None:
            return _stream_from_global_rng(self._global_stream, return_tensors)
        torch = sys.modules.get("torch")
        worker = torch.utils.data.get_worker_info() if torch is not None else None
        if self._pid != os.getpid():
            # A DataLoader worker's copy: it carries the parent's count, but its batches start at its id.
            self._pid, self._calls = os.getpid(), 0
            if worker is not None and not self._epoch_given:
                # Workers of one iterator share its base seed (each seeds torch with base + id).
                self.epoch = self._iterators.number(worker.seed - worker.id)
        calls, self._calls = self._calls, self._calls + 1
        # DataLoader hands map-style batches to its workers round-robin, in order.
        local = calls if worker is None else calls * worker.num_workers + worker.id
        rank, world_size = self.rank, self.world_size
        if world_size is None:
            distributed = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        return np.random.PCG64([local * world_size + rank, self.epoch, self.seed])

    # --- the masker, kept in step with the public attributes ---------------------------------------------

    def _sync_masker(self):
        # Objects by identity: a tokenizer or an id array compared by value would cost a pass per batch.
        random_ids = self.random_ids if isinstance(self.random_ids, str) else id(self.random_ids)
        settings = (id(self.tokenizer), self.whole_word_mask, self.mlm_probability, self.mask_replace_prob,
                    self.random_replace_prob, self.exact, self.span, random_ids, self.seed)
        if settings != self._masker_settings:
            scheme = self.whole_word_mask if isinstance(self.whole_word_mask, str) else None
            if self.whole_word_mask is True:
                scheme = word_scheme(list(self.tokenizer.get_vocab()))
            self.masker = Masker.from_tokenizer(
                self.tokenizer, whole_word=scheme, mlm_probability=self.mlm_probability,
                mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
                exact=self.exact, span=self.span, seed=self.seed or 0, random_ids=self.random_ids,
                valid_ids=None, strict_ids=False,
            )
            self._masker_settings = settings
        return self.masker

    def _word_features(self):
        """The features that tell words apart, for this collator's whole-word mode (none without it)."""
        if self.whole_word_mask is not True:
            return ()
        # Byte-level BPE and SentencePiece vocabularies mark word starts themselves: their offsets add nothing.
        return ("word_ids", "offset_mapping") if self.masker.whole_word in (None, "wordpiece") else ("word_ids",)

    def _word_start_mask(self, batch):
        offsets, word_ids = batch.pop("offset_mapping", None), batch.pop("word_ids", None)
        if self.whole_word_mask is not True:
            return None
        if word_ids is not None:
            return _word_starts_from_word_ids(word_ids)
        if offsets is not None:
            return _word_starts_from_offsets(offsets)
        if self.masker.whole_word is None:
            raise ValueError("whole-word masking with this tokenizer (no '##', 'Ġ' or '▁' word marks in its "
                             "vocabulary) needs features with offset_mapping (tokenize with "
                             "return_offsets_mapping=True) or word_ids")
        return None

    # --- collation --------------------------------------------------------------------------------------

    def __call__(self, features, return_tensors=None):
        return_tensors = _check_return_tensors(self.return_tensors if return_tensors is None else return_tensors)
        if not self.mlm:
            batch = _causal_lm_batch(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                                     padding_side=self.padding_side, return_tensors=return_tensors)
            return _to_tensors(batch, return_tensors)
        masker = self._sync_masker()
        word_features = self._word_features()
        batch = pad_features(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                             padding_side=self.padding_side, pad_token_type_id=self.pad_token_type_id,
                             skip=[key for key in _DROPPED_KEYS if key not in word_features + ("special_tokens_mask",)],
                             return_tensors=return_tensors)
        word_starts = self._word_start_mask(batch)
        special = batch.pop("special_tokens_mask", None)
        ids, attention = batch["input_ids"], batch.get("attention_mask")
        if self.fixed:
            batch["input_ids"], batch["labels"] = masker.mask_fixed(
                ids, attention, special_tokens_mask=special, word_start_mask=word_starts)
        else:
            batch["input_ids"], batch["labels"] = masker.mask_with(
                ids, attention, self._bit_generator(return_tensors), special_tokens_mask=special,
                word_start_mask=word_starts)
        return _to_tensors(batch, return_tensors)


# One name for transformers users: DataCollatorForLanguageModeling(tokenizer, mlm=True|False, ...).
DataCollatorForLanguageModeling = DataCollatorForMLM


def _stream_from_global_rng(bit_generator, return_tensors):
    """``bit_generator`` set to a state drawn from the RNG transformers' collator draws from: torch's global
    one, numpy's for "np". Setting a PCG64 state costs a tenth of seeding a new PCG64 from a key."""
    if return_tensors == "pt":
        import torch

        key = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    else:
        key = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
    # Spread the 63 random bits over PCG64's 128-bit state (an odd multiplier is a bijection mod 2**128).
    state = (key * 0x9E3779B97F4A7C15F39CC0605CEDC835) % 2**128
    increment = ((key ^ _GLOBAL_RNG_TAG) << 1) | 1
    bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": increment},
                           "has_uint32": 0, "uinteger": 0}
    return bit_generator


class _IteratorCount:
    """Numbers the DataLoader iterators whose worker processes run a collator, across those processes.

    Worker processes start afresh with every iterator (every epoch, unless persistent) from a copy of the
    collator, so they cannot count epochs themselves. All workers of one iterator share its base seed, so
    a worker that sees a base seed other than the last one is the first of the next iterator. The count
    lives in shared memory, handed to the workers when they start; any other copy (pickle, deepcopy)
    starts a count of its own.
    """

    def __init__(self):
        import multiprocessing

        self._lock = multiprocessing.Lock()
        self._state = multiprocessing.RawArray("q", [-1, 0])  # [iterators seen - 1, last base seed]

    def number(self, base_seed):
        with self._lock:
            if self._state[0] < 0 or self._state[1] != base_seed:
                self._state[0] += 1
                self._state[1] = base_seed
            return self._state[0]

    def __getstate__(self):
        import multiprocessing
        from multiprocessing import context

        if context.get_spawning_popen() is None:
            return {"fresh": True}
        if getattr(self._lock, "_is_fork_ctx", False):
            # A fork-context lock cannot go to spawn or forkserver workers. Workers take the lock only at
            # their first batch, so the parent can switch to one that can before any of them starts.
            self._lock = multiprocessing.get_context("spawn").Lock()
        return self.__dict__

    def __setstate__(self, state):
        if state.get("fresh"):
            self.__init__()
        else:
            self.__dict__.update(state)


class DataCollatorForCLM:
    """Causal-LM batches: ``labels`` = ``input_ids`` with -100 on padding.

    Like ``DataCollatorForLanguageModeling(mlm=False)``, except that padding is found by the attention mask,
    not by the pad id, so EOS tokens keep their labels when pad == eos (transformers #23530), and that a
    tokenizer without a pad token pads with EOS.

    ``padding_free=True`` is transformers' ``DataCollatorWithFlattening``, with its arguments: the examples
    are concatenated into one (1, total) row (empty ones dropped), labels are the given ``labels`` or the
    input_ids, with each example's first label replaced by ``separator_id`` (-100: it would be predicted
    from the previous example); ``position_ids`` restart at ``position_ids_start`` for each example
    (RoBERTa-style models count from padding_idx + 1 = 2); ``return_flash_attn_kwargs=True`` adds
    ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` for flash-attention varlen kernels,
    ``return_seq_idx=True`` the example of each token (int32).
    """

    def __init__(self, tokenizer=None, mlm=False, *, pad_id=None, padding_free=False, return_position_ids=True,
                 separator_id=IGNORE_INDEX, position_ids_start=0, return_flash_attn_kwargs=False, return_seq_idx=False,
                 pad_to_multiple_of=None, return_tensors="pt"):
        if check_flag("mlm", mlm):
            raise ValueError("DataCollatorForCLM makes causal-LM batches (mlm=False); use DataCollatorForMLM for "
                             "masked LM")
        self.tokenizer = tokenizer
        self.mlm = False
        self.pad_id = _clm_pad_id(tokenizer) if pad_id is None else pad_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.padding_free = check_flag("padding_free", padding_free)
        self.return_position_ids = check_flag("return_position_ids", return_position_ids)
        self.return_flash_attn_kwargs = check_flag("return_flash_attn_kwargs", return_flash_attn_kwargs)
        self.return_seq_idx = check_flag("return_seq_idx", return_seq_idx)
        self.separator_id = separator_id
        self.position_ids_start = position_ids_start
        self.pad_to_multiple_of = _check_multiple(pad_to_multiple_of)
        self.return_tensors = _check_return_tensors(return_tensors)

    def __call__(self, features, return_tensors=None, separator_id=None):
        return_tensors = _check_return_tensors(self.return_tensors if return_tensors is None else return_tensors)
        if self.padding_free:
            separator_id = self.separator_id if separator_id is None else separator_id
            return _to_tensors(self._flatten(features, separator_id), return_tensors)
        batch = _causal_lm_batch(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                                 padding_side=self.padding_side, return_tensors=return_tensors)
        return _to_tensors(batch, return_tensors)

    def _flatten(self, features, separator_id):
        if not features:
            raise ValueError("cannot collate an empty list of features")
        check_int_type("separator_id", separator_id)
        check_int_type("position_ids_start", self.position_ids_start)
        as_dicts = isinstance(features[0], Mapping)
        rows = [_int_row("input_ids", i, f["input_ids"] if as_dicts else f) for i, f in enumerate(features)]
        keep = [i for i, row in enumerate(rows) if len(row)]  # empty examples are dropped, as in transformers
        if not keep:
            raise ValueError("every example is empty: nothing to collate")
        rows = [rows[i] for i in keep]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = offsets[:-1]
        tokens = np.empty(int(offsets[-1]), dtype=np.int64)
        _copy_rows("input_ids", rows, tokens, starts)
        labels = tokens.copy()
        if as_dicts and "labels" in features[0]:
            # Given labels win (e.g. prompts masked for SFT), as in DataCollatorWithFlattening.
            for i in keep:
                if "labels" not in features[i]:
                    raise ValueError(f"example {i} has no labels but example 0 has")
            given = [_int_row("labels", i, features[i]["labels"]) for i in keep]
            for i, row, n in zip(keep, given, lengths):
                if len(row) != n:
                    raise ValueError(f"labels of example {i} have {len(row)} entries, its input_ids {n} tokens")
            _copy_rows("labels", given, labels, starts)
        # Each example's first token would be predicted from the previous example.
        labels[starts] = separator_id
        batch = {"input_ids": tokens[None, :], "labels": labels[None, :]}
        if self.return_position_ids:
            positions = np.arange(tokens.shape[0], dtype=np.int64) - np.repeat(starts, lengths)
            batch["position_ids"] = (positions + self.position_ids_start)[None, :]
        if self.return_seq_idx:
            batch["seq_idx"] = np.repeat(np.arange(len(rows), dtype=np.int32), lengths)[None, :]
        if self.return_flash_attn_kwargs:
            cu_seq_lens = offsets.astype(np.int32)
            batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                         max_length_q=int(lengths.max()), max_length_k=int(lengths.max()))
        return batch
