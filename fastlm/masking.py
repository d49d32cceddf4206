"""Masked-LM masks from a Cython kernel: the tutorial's ``DataCollatorForLanguageModeling`` semantics, fast
and reproducible, plus exact-count, whole-word and span masking.

Semantics (transformers 5 ``torch_mask_tokens``): each eligible token is selected with probability
``mlm_probability``; a selected token becomes a target (its label is its id; every other label is -100),
then is replaced by the mask id with probability ``mask_replace_prob``, by a random id with probability
``random_replace_prob`` (both fractions of all selected tokens), and otherwise kept. Special tokens and
padding (attention 0) are never selected; a given ``special_tokens_mask`` replaces the id-based specials,
as in HF. Random ids are drawn uniformly from ``random_ids``: :meth:`Masker.from_tokenizer` draws from the
*non-special* ids the vocabulary has unless asked for HF's ``range(len(tokenizer))`` (``random_ids="vocab"``,
what the collators use).

Reproducibility: :class:`Masker` keys the random stream of each batch by ``(seed, epoch, batch_index)``
(``PCG64([batch_index, epoch, seed])``), so a batch gets the same mask whatever the number of DataLoader
workers or ranks; :meth:`Masker.mask_fixed` keys each row by its own tokens, for evaluation sets whose
masks must not change between runs, batch sizes or checkpoints.
"""
import hashlib
from dataclasses import dataclass

import numpy as np

from fastlm._kernels import load
from fastlm._validation import (
    bit_generator_of,
    check_int_in,
    check_non_negative_int,
    check_probability,
    check_rng,
    is_int,
)
from fastlm.packing import check_token_dtype
from fastlm.tokenizer import vocab_size as tokenizer_vocab_size

_k = load("_masking")

WORD_SCHEMES = ("wordpiece", "bpe", "sentencepiece")
# Ids at or above this are no tokenizer's (the largest vocabularies hold ~1M ids): growing the per-id tables
# that far would only allocate memory for a batch that no embedding can take.
_MAX_TABLE_IDS = 2**24
# Separates the evaluation streams' keys [row digest, tag, seed] from training keys [batch, epoch, seed].
_FIXED_STREAM_TAG = 0x6D61736B_66697864


@dataclass(frozen=True)
class Span:
    """SpanBERT span masking: span lengths ~ Geometric(p) truncated at max_length (redrawn past it).

    Spans start at a uniformly drawn unit (token, or word with whole-word masking) and cover ``length``
    consecutive units, until ``mlm_probability`` of the row's eligible tokens are selected. ``p`` must be
    at least ``SPAN_MIN_P`` (1e-4): each length costs about 1/p random draws.
    """

    p: float = 0.2
    max_length: int = 10


# Span lengths past max_length are redrawn, so one length costs about 1/p draws of the kernel, which runs
# with the GIL released and cannot be interrupted: p = 1e-12 would spin for hours.
SPAN_MIN_P = 1e-4


def _threshold(probability):
    """p as a threshold on 32-bit draws: a draw u selects when u < p * 2**32 (p = 1 always selects)."""
    return int(round(probability * 2**32))


# Gap tables stop here; longer gaps continue by memorylessness (only p < ~0.005 gets that far).
_GAP_TABLE_MAX = 4096


def _gap_tables(probability):
    """Tables for Geometric(p) gaps by inversion of a 32-bit draw u (see csrc/_masking.pyx).

    table[k] = round((1 - p)**k * 2**32), so P(gap >= k) = table[k] / 2**32; it runs to the first k whose
    entry is 0 (or to _GAP_TABLE_MAX). guess[b] is the gap of u = the largest value with u >> 22 == b.
    p = 0 gives a one-entry table: never select.
    """
    if probability == 0:
        return np.array([2**32], dtype=np.uint64), np.zeros(1024, dtype=np.int64)
    if probability < 2**-32:
        # (1 - p) rounds to 1 on the 32-bit scale: the table would never decay and the kernel never stop.
        raise ValueError(f"mlm_probability must be 0 or at least 2**-32 (about 2.3e-10), got {probability!r}")
    q = 1.0 - probability
    table = [2**32]
    while table[-1] > 0 and len(table) <= _GAP_TABLE_MAX:
        table.append(round(q ** len(table) * 2**32))
    table = np.array(table, dtype=np.uint64)
    top = (np.arange(1024, dtype=np.uint64) + 1) * 2**22 - 1
    # Entries 1..K-1 above u, counted on the reversed (increasing) table.
    guess = (table.size - 1) - np.searchsorted(table[::-1], top, side="right")
    guess = np.clip(guess, 0, table.size - 2).astype(np.int64)
    return table, guess


def _check_id(name, value, vocab_size):
    if not is_int(value):
        raise TypeError(f"{name} must be an int token id, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
    return int(value)


def _vocab_table(name, values, vocab_size):
    table = np.asarray(values)
    if table.shape != (vocab_size,):
        raise ValueError(f"{name} must have one entry per vocabulary id ({vocab_size}), got shape {table.shape}")
    return np.ascontiguousarray(table != 0, dtype=np.uint8)


def _as_token_matrix(input_ids):
    """(ids as a (B, L) C-contiguous token array, the torch module if the input was a tensor, else None)."""
    torch = None
    if type(input_ids).__module__.startswith("torch"):
        import torch

        if input_ids.device.type != "cpu":
            raise ValueError(f"input_ids must be on the CPU, got device {input_ids.device}")
        # Checked before .numpy(): a float tensor that requires grad would fail there with torch's message.
        check_token_dtype(str(input_ids.dtype).removeprefix("torch."), "input_ids")
        input_ids = input_ids.numpy()
    if not isinstance(input_ids, np.ndarray):
        raise TypeError(f"input_ids must be a numpy array, memmap or torch tensor, got {type(input_ids).__name__}")
    check_token_dtype(input_ids.dtype, "input_ids")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {input_ids.shape}")
    if not input_ids.flags.c_contiguous:
        # A silent ascontiguousarray would copy a memmap; the caller decides.
        raise ValueError("input_ids must be C-contiguous (got a strided view)")
    return input_ids, torch


def _as_flags(name, flags, shape):
    """A (B, L) 0/1 mask (attention, special tokens, word starts) as the kernel's uint8 array, or None."""
    if flags is None:
        return None
    if type(flags).__module__.startswith("torch"):
        flags = flags.cpu().numpy()
    flags = np.asarray(flags)
    if flags.shape != shape:
        raise ValueError(f"{name} has shape {flags.shape}, input_ids {shape}")
    if flags.dtype.kind not in "biu":
        raise TypeError(f"{name} must hold integers or booleans, got dtype {flags.dtype}")
    # A (B, L) byte copy: small next to the tokens, and it normalises every mask dtype for the kernel.
    return np.ascontiguousarray(flags != 0, dtype=np.uint8)


def _pool_for_kernel(pool):
    """The kernel's two forms of the random-replacement pool (pool table, excluded ids).

    The kernel draws index k < pool size and takes the k-th id of [0, inf) minus ``excluded``, or
    ``pool[k]`` when the table is given. Few exclusions (the usual specials, or none for HF's
    range(len(tokenizer))) keep a 50k-entry table out of the cache the token streams use."""
    top = int(pool[-1]) + 1 if pool.size else 0
    excluded = np.setdiff1d(np.arange(top, dtype=np.int64), pool, assume_unique=True)
    if excluded.size <= 64:
        return np.empty(0, np.int64), excluded
    return pool, np.empty(0, np.int64)


class Masker:
    """Masked-LM masking over (batch, seq) token arrays; see the module docstring for the semantics.

    Args:
        vocab_size: ids must lie in [0, vocab_size) (the model's embedding rows may be more).
        mask_id: the mask token's id (required).
        special_ids: ids never selected and never drawn as random replacements (None entries are skipped,
            as tokenizers report missing specials); ``mask_id`` is always one of them.
        mlm_probability: selection probability per eligible token (or word; see ``exact``).
        mask_replace_prob, random_replace_prob: fractions of the selected tokens replaced by the mask id and
            by a random id from ``random_ids`` (transformers 5 semantics); the rest keep their id.
        exact: select exactly round(mlm_probability x eligible units) units per row (fairseq, Megatron)
            instead of Bernoulli trials.
        whole_word: None, ``"wordpiece"``, ``"bpe"`` or ``"sentencepiece"``: select whole words, from
            ``word_starts`` (one flag per id: the id begins a word). :meth:`from_tokenizer` builds the table.
            A call's ``word_start_mask`` (one flag per position) gives whole words with any tokenizer.
        span: None, True (= ``Span()``) or a :class:`Span`: SpanBERT span masking.
        seed: the run's seed; streams are keyed by (seed, epoch, batch_index).
        valid_ids: the ids the tokenizer actually has (default: all of range(vocab_size)); others are
            never selected (a vocabulary with holes, like RoBERTa's 50262-entry file).
        random_ids: the ids random replacements are drawn from (default: the valid non-special ids).
        strict_ids: refuse ids >= vocab_size (default). False treats them as ordinary tokens, as
            transformers does: the model's embedding, not the tokenizer, decides which ids exist.
    """

    def __init__(self, *, vocab_size, mask_id, special_ids, mlm_probability=0.15, mask_replace_prob=0.8,
                 random_replace_prob=0.1, exact=False, whole_word=None, word_starts=None, span=None, seed=0,
                 valid_ids=None, random_ids=None, strict_ids=True):
        # Per-id tables are vocab_size bytes each: past _MAX_TABLE_IDS they would only waste memory.
        self.vocab_size = check_int_in("vocab_size", vocab_size, 1, _MAX_TABLE_IDS, shown="[1, 2**24]")
        if mask_id is None:
            raise ValueError("no mask id: masked-LM masking needs the tokenizer's mask token (e.g. <mask>, [MASK])")
        self.mask_id = _check_id("mask_id", mask_id, self.vocab_size)
        self.mlm_probability = check_probability("mlm_probability", mlm_probability)
        self.mask_replace_prob = check_probability("mask_replace_prob", mask_replace_prob)
        self.random_replace_prob = check_probability("random_replace_prob", random_replace_prob)
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-12:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must not exceed 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        self.seed = check_non_negative_int("seed", seed)

        if whole_word not in (None,) + WORD_SCHEMES:
            raise ValueError(f"whole_word must be None, 'wordpiece', 'bpe' or 'sentencepiece', got {whole_word!r}")
        if whole_word is not None and word_starts is None:
            raise ValueError("whole_word needs word_starts (one flag per id), or use Masker.from_tokenizer")
        self.whole_word = whole_word
        self.word_starts = None if whole_word is None else _vocab_table("word_starts", word_starts, self.vocab_size)

        if span is True:
            span = Span()
        if span is not None and not isinstance(span, Span):
            raise TypeError(f"span must be None, True or a fastlm.masking.Span, got {span!r}")
        if span is not None:
            if check_probability("Span.p", span.p) < SPAN_MIN_P:
                raise ValueError(
                    f"Span.p must be at least {SPAN_MIN_P} (a span length costs about 1/p random draws), "
                    f"got {span.p!r}; at p = {SPAN_MIN_P} lengths are already within 1% of uniform for max_length <= 100"
                )
            check_int_in("Span.max_length", span.max_length, 1, 2**63 - 1, shown="[1, 2**63)")
            if exact:
                raise ValueError("span masking already selects a fixed budget of tokens; drop exact=True")
        self.span = span
        self.exact = bool(exact)

        selectable = np.zeros(self.vocab_size, dtype=np.uint8)
        if valid_ids is None:
            selectable[:] = 1
        else:
            valid_ids = np.asarray(valid_ids, dtype=np.int64)
            if valid_ids.size and (valid_ids.min() < 0 or valid_ids.max() >= self.vocab_size):
                raise ValueError(f"valid_ids must lie in [0, {self.vocab_size})")
            selectable[valid_ids] = 1
        if isinstance(special_ids, (str, bytes)) or not hasattr(special_ids, "__iter__"):
            raise TypeError(f"special_ids must be a collection of ids (e.g. tokenizer.all_special_ids), got {special_ids!r}")
        self.special_ids = sorted({self.mask_id} | {
            _check_id("special id", i, self.vocab_size) for i in special_ids if i is not None
        })
        eligible = selectable.copy()
        eligible[self.special_ids] = 0
        self.eligible = eligible
        # Where a call brings its own special_tokens_mask, that mask alone decides (as in HF).
        self._selectable = selectable
        if random_ids is None:
            self.pool = np.flatnonzero(eligible).astype(np.int64)
        else:
            self.pool = np.unique(np.asarray(random_ids, dtype=np.int64))
            if self.pool.size and (self.pool[0] < 0 or self.pool[-1] >= self.vocab_size):
                raise ValueError(f"random_ids must lie in [0, {self.vocab_size})")
        self._kernel_pool = _pool_for_kernel(self.pool)
        if self.pool.size == 0 and self.random_replace_prob > 0:
            raise ValueError("random_replace_prob > 0 but there is no id to draw random replacements from: "
                             "pass random_replace_prob=0, or random_ids (from_tokenizer: random_ids='vocab')")
        self.strict_ids = bool(strict_ids)
        # Per-id tables grown past vocab_size for batches with larger ids (strict_ids=False), built once.
        self._grown = None

        self._gap_table, self._gap_guess = _gap_tables(self.mlm_probability)
        self._mode = _k.SPAN if span is not None else _k.EXACT if exact else _k.BERNOULLI
        self._thresholds = dict(
            mask_threshold=_threshold(self.mask_replace_prob),
            random_threshold=_threshold(min(1.0, self.mask_replace_prob + self.random_replace_prob)),
            span_threshold=_threshold(span.p) if span else 0,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer, *, whole_word=None, random_ids="non_special", **kwargs):
        """A Masker for a transformers tokenizer: its vocabulary, special ids and mask id.

        ``whole_word``: None, ``"wordpiece"`` (``##`` continuations), ``"bpe"`` (``Ġ`` word starts),
        ``"sentencepiece"`` (``▁`` word starts), or True / ``"auto"`` to detect the scheme from the vocabulary.
        ``random_ids``: ``"non_special"`` (the ids the vocabulary has, specials excluded), ``"vocab"``
        (transformers' ``range(len(tokenizer))``) or an array of ids.
        """
        vocab = tokenizer.get_vocab()
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
        vocab_size = tokenizer_vocab_size(tokenizer)
        word_starts = None
        if whole_word is not None and whole_word is not False:
            tokens = list(vocab)
            if whole_word in (True, "auto"):
                whole_word = _detect_word_scheme(tokens)
            word_starts = word_start_table(tokens, ids, vocab_size, whole_word)
        kwargs.setdefault("special_ids", tokenizer.all_special_ids)
        kwargs.setdefault("mask_id", tokenizer.mask_token_id)
        kwargs.setdefault("valid_ids", ids)
        if isinstance(random_ids, str):
            if random_ids == "non_special":
                specials = [i for i in [kwargs["mask_id"], *kwargs["special_ids"]] if i is not None]
                random_ids = np.setdiff1d(ids, np.asarray(specials, dtype=np.int64))
            elif random_ids == "vocab":
                random_ids = np.arange(len(tokenizer), dtype=np.int64)
            else:
                raise ValueError(f"random_ids must be 'non_special', 'vocab' or an array of ids, got {random_ids!r}")
        return cls(vocab_size=vocab_size, whole_word=whole_word or None, word_starts=word_starts,
                   random_ids=random_ids, **kwargs)

    # --- masking ---------------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, *, epoch=0, batch_index=0, special_tokens_mask=None,
                 word_start_mask=None):
        """Mask one batch: returns (masked input_ids, labels), int64 (B, L), labels -100 off target.

        The stream is PCG64([batch_index, epoch, seed]): the same batch gets the same mask in any process.
        Torch input gives torch output (zero-copy both ways). ``special_tokens_mask`` (1 = never select)
        replaces the id-based specials; ``word_start_mask`` (1 = this position begins a word) gives whole
        words by position, whatever the tokenizer.
        """
        epoch = check_non_negative_int("epoch", epoch)
        batch_index = check_non_negative_int("batch_index", batch_index)
        return self.mask_with(input_ids, attention_mask, np.random.PCG64([batch_index, epoch, self.seed]),
                              special_tokens_mask=special_tokens_mask, word_start_mask=word_start_mask)

    def mask_with(self, input_ids, attention_mask, rng, *, special_tokens_mask=None, word_start_mask=None):
        """Mask with draws from ``rng`` (a numpy Generator or BitGenerator), advancing it; not keyed."""
        bit_generator = bit_generator_of(rng)
        ids, torch = _as_token_matrix(input_ids)
        attention, starts, eligible, word_starts = self._prepare(ids, attention_mask, special_tokens_mask,
                                                                 word_start_mask)
        out_ids = np.empty(ids.shape, dtype=np.int64)
        labels = np.empty(ids.shape, dtype=np.int64)
        self._run(ids, attention, starts, eligible, word_starts, bit_generator, out_ids, labels)
        return (torch.from_numpy(out_ids), torch.from_numpy(labels)) if torch else (out_ids, labels)

    def mask_fixed(self, input_ids, attention_mask=None, *, special_tokens_mask=None, word_start_mask=None):
        """Evaluation masks: each row's stream is keyed by its own (attended) tokens and the seed.

        A row gets the same mask whatever its batch, position, padding, epoch or checkpoint, so MLM
        perplexity is comparable across runs. Identical rows get identical masks.
        """
        ids, torch = _as_token_matrix(input_ids)
        attended = _as_flags("attention_mask", attention_mask, ids.shape)
        attention, starts, eligible, word_starts = self._prepare(ids, attention_mask, special_tokens_mask,
                                                                 word_start_mask)
        out_ids = np.empty(ids.shape, dtype=np.int64)
        labels = np.empty(ids.shape, dtype=np.int64)
        for r in range(ids.shape[0]):
            row = ids[r] if attended is None else ids[r][attended[r] != 0]
            digest = int.from_bytes(hashlib.blake2b(row.astype(np.int64).tobytes(), digest_size=8).digest(), "little")
            stream = np.random.PCG64([digest, _FIXED_STREAM_TAG, self.seed])
            self._run(ids[r:r + 1], None if attention is None else attention[r:r + 1],
                      None if starts is None else starts[r:r + 1], eligible, word_starts, stream,
                      out_ids[r:r + 1], labels[r:r + 1])
        return (torch.from_numpy(out_ids), torch.from_numpy(labels)) if torch else (out_ids, labels)

    def _prepare(self, ids, attention_mask, special_tokens_mask, word_start_mask):
        """Checked kernel inputs: (attention, per-position word starts, eligible table, word-start table)."""
        attention = _as_flags("attention_mask", attention_mask, ids.shape)
        special = _as_flags("special_tokens_mask", special_tokens_mask, ids.shape)
        starts = _as_flags("word_start_mask", word_start_mask, ids.shape)
        eligible, selectable, word_starts = self._tables_for(ids)
        if special is not None:
            # The given mask replaces the id-based specials: fold it into attention, select by existence only.
            not_special = special == 0
            attention = not_special.view(np.uint8) if attention is None else attention & not_special
            eligible = selectable
        return attention, starts, eligible, word_starts

    def _tables_for(self, ids):
        """(eligible, selectable, word_starts) per-id tables covering every id of the batch."""
        bad = _k.first_out_of_range(ids, self.vocab_size)
        if bad < 0:
            return self.eligible, self._selectable, self.word_starts
        row, col = divmod(bad, ids.shape[1])
        if self.strict_ids:
            raise ValueError(
                f"input_ids[{row}, {col}] = {ids[row, col]} is outside the vocabulary [0, {self.vocab_size})"
            )
        smallest, largest = int(ids.min()), int(ids.max())
        if smallest < 0 or largest >= _MAX_TABLE_IDS:
            value = smallest if smallest < 0 else largest
            row, col = np.argwhere(ids == value)[0]
            raise ValueError(f"input_ids[{row}, {col}] = {value} is not a token id of any model "
                             f"(ids lie in [0, 2**24)); the embedding lookup would fail on it")
        if self._grown is None or self._grown[0].shape[0] <= largest:
            # Ids the tokenizer does not know are ordinary tokens (each its own word), as in transformers.
            extra = largest + 1 - self.vocab_size
            ones = np.ones(extra, dtype=np.uint8)
            self._grown = tuple(None if table is None else np.concatenate([table, ones])
                                for table in (self.eligible, self._selectable, self.word_starts))
        return self._grown

    def _run(self, ids, attention, starts, eligible, word_starts, bit_generator, out_ids, labels):
        _k.mask_batch(
            ids, attention, eligible, word_starts, starts, *self._kernel_pool, self.pool.size, self.mask_id,
            self._mode, self.mlm_probability, self._gap_table, self._gap_guess, self._thresholds["mask_threshold"],
            self._thresholds["random_threshold"], self._thresholds["span_threshold"],
            self.span.max_length if self.span else 0, bit_generator, out_ids, labels,
        )


# WordPiece marks continuations, byte-level BPE (Ġ, the encoded space) and SentencePiece (▁) word starts.
_WORD_MARKERS = {"wordpiece": "##", "bpe": "\u0120", "sentencepiece": "\u2581"}


def word_scheme(tokens):
    """The vocabulary's word marking ("wordpiece", "bpe", "sentencepiece"), or None when none is common.

    By majority: byte-level BPE vocabularies also hold a few "##..." tokens (and WordPiece a stray "Ġ")."""
    counts = {scheme: sum(t.startswith(marker) for t in tokens) for scheme, marker in _WORD_MARKERS.items()}
    scheme = max(counts, key=counts.get)
    return scheme if counts[scheme] >= 0.05 * len(tokens) else None


def _detect_word_scheme(tokens):
    scheme = word_scheme(tokens)
    if scheme is None:
        raise ValueError(
            "cannot tell the tokenizer's word scheme (few '##', 'Ġ' or '▁' tokens); pass whole_word='wordpiece', "
            "'bpe' or 'sentencepiece', or give the collator features with offset_mapping or word_ids"
        )
    return scheme


def word_start_table(tokens, ids, vocab_size, scheme):
    """Per-id flags: does this token begin a word? WordPiece: not a ``##`` continuation; byte-level BPE:
    starts with ``Ġ`` (the encoded space); SentencePiece: starts with ``▁``. Built once per tokenizer, so
    whole-word masking is O(L)."""
    if scheme not in WORD_SCHEMES:
        raise ValueError(f"whole_word must be 'wordpiece', 'bpe' or 'sentencepiece', got {scheme!r}")
    marker = _WORD_MARKERS[scheme]
    if scheme == "wordpiece":
        starts = [not t.startswith(marker) for t in tokens]
    else:
        starts = [t.startswith(marker) for t in tokens]
    table = np.zeros(vocab_size, dtype=np.uint8)
    table[np.asarray(ids, dtype=np.int64)] = np.asarray(starts, dtype=np.uint8)
    return table


def mask_tokens(input_ids, attention_mask=None, *, rng=None, epoch=0, batch_index=0, tokenizer=None, seed=None,
                **masker_kwargs):
    """Mask a (batch, seq) numpy array or torch tensor in one call: returns (masked ids, labels).

    The masker comes from ``tokenizer`` (``Masker.from_tokenizer``) or from ``masker_kwargs``
    (``vocab_size``, ``mask_id``, ``special_ids``, ...; see :class:`Masker`). ``rng`` is taken as numpy's
    ``default_rng`` takes it: a Generator (or BitGenerator) is drawn from and advanced; an int is a seed,
    and the draws come from the stream keyed by (seed, epoch, batch_index), as :class:`Masker` keys its
    batches; None is seed 0, so a call without ``rng`` is reproducible. ``seed=`` is the older spelling of
    an int ``rng`` and still works. For many batches build one :class:`Masker` and call it: that skips
    rebuilding the vocabulary tables.
    """
    if seed is not None and rng is not None:
        raise TypeError("pass rng or seed, not both (seed=s is the older spelling of rng=s)")
    rng = check_rng(rng)
    keyed = rng is None or isinstance(rng, int)
    if keyed:
        # Masker checks the seed (an old-style seed= may be anything).
        masker_kwargs["seed"] = seed if seed is not None else rng or 0
    masker = Masker.from_tokenizer(tokenizer, **masker_kwargs) if tokenizer is not None else Masker(**masker_kwargs)
    if keyed:
        return masker(input_ids, attention_mask, epoch=epoch, batch_index=batch_index)
    return masker.mask_with(input_ids, attention_mask, rng)
