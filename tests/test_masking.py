import hashlib
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.masking import Masker, Span, mask_tokens
from fastlm.packing import IGNORE_INDEX
from tests.data import wikitext_lines
from tests.reference import RefBits, ref_mask, ref_units

DTYPES = [np.uint16, np.uint32, np.int32, np.int64]
CONTAINERS = ["array", "readonly", "memmap"]
MODES = ["bernoulli", "exact", "span"]


def as_container(array, container):
    if container == "readonly":
        array = array.copy()
        array.setflags(write=False)
    elif container == "memmap" and array.size:
        path = tempfile.NamedTemporaryFile(suffix=".bin", delete=False).name
        array.tofile(path)
        array = np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)
        os.unlink(path)  # the mapping outlives the name: nothing is left in /tmp
    return array


def binomial_ok(count, n, p, sigmas=5.0):
    """count within `sigmas` standard deviations of Binomial(n, p)'s mean (fixed seeds: cannot flake)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@st.composite
def masking_cases(draw):
    vocab_size = draw(st.integers(2, 40))
    mask_id = draw(st.integers(0, vocab_size - 1))
    specials = draw(st.sets(st.integers(0, vocab_size - 1), max_size=4))
    rows, length = draw(st.integers(0, 4)), draw(st.integers(0, 24))
    n = rows * length
    # strict_ids=False: ids past the vocabulary are ordinary tokens (transformers' toy vocabularies).
    strict_ids = draw(st.booleans())
    top = vocab_size if strict_ids else vocab_size + 6
    ids = draw(st.lists(st.integers(0, top - 1), min_size=n, max_size=n))
    flags = st.lists(st.integers(0, 1), min_size=n, max_size=n)
    attention = draw(st.one_of(st.none(), flags))
    mode = draw(st.sampled_from(MODES))
    whole_word = draw(st.sampled_from(["none", "table", "positions"]))
    word_starts = draw(st.lists(st.booleans(), min_size=vocab_size, max_size=vocab_size))
    mask_replace = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    random_replace = draw(st.sampled_from([0.0, 0.1, 0.5])) if mask_replace < 1 else 0.0
    return dict(
        vocab_size=vocab_size, mask_id=mask_id, specials=specials, ids=ids, shape=(rows, length),
        attention=attention, mode=mode, word_starts=word_starts if whole_word == "table" else None,
        word_starts_at=draw(flags) if whole_word == "positions" else None,
        special_mask=draw(st.one_of(st.none(), flags)), random_ids=draw(st.sampled_from(["non_special", "vocab"])),
        strict_ids=strict_ids,
        p=draw(st.sampled_from([0.0, 0.15, 0.5, 1.0])), mask_replace=mask_replace,
        random_replace=min(random_replace, 1 - mask_replace), span=Span(draw(st.sampled_from([0.2, 0.5, 1.0])),
                                                                        draw(st.integers(1, 5))),
        seed=draw(st.integers(0, 2**40)), epoch=draw(st.integers(0, 3)), batch_index=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=300, deadline=None)
@given(case=masking_cases(), dtype=st.sampled_from(DTYPES), container=st.sampled_from(CONTAINERS))
def test_kernel_matches_reference(case, dtype, container):
    if case["mode"] != "bernoulli" and case["p"] == 1.0 and case["shape"][1] > 16:
        case["p"] = 0.5  # keep the span coupon-collector loop short
    vocab_size, shape = case["vocab_size"], case["shape"]
    specials = case["specials"] | {case["mask_id"]}
    pool = list(range(vocab_size)) if case["random_ids"] == "vocab" else [
        i for i in range(vocab_size) if i not in specials]
    if case["random_replace"] > 0 and not pool:
        return  # nothing to draw random replacements from: rejected, tested in test_bad_input
    masker = Masker(
        vocab_size=vocab_size, mask_id=case["mask_id"], special_ids=case["specials"],
        mlm_probability=case["p"], mask_replace_prob=case["mask_replace"], random_replace_prob=case["random_replace"],
        exact=case["mode"] == "exact", span=case["span"] if case["mode"] == "span" else None,
        whole_word=None if case["word_starts"] is None else "wordpiece", word_starts=case["word_starts"],
        seed=case["seed"], random_ids=pool if case["random_ids"] == "vocab" else None, strict_ids=case["strict_ids"],
    )
    ids = as_container(np.array(case["ids"], dtype=dtype).reshape(shape), container)

    def matrix(flags):
        return None if flags is None else np.array(flags, dtype=np.int64).reshape(shape)

    attention, special = matrix(case["attention"]), matrix(case["special_mask"])
    starts_at = matrix(case["word_starts_at"])
    out, labels = masker(ids, attention, epoch=case["epoch"], batch_index=case["batch_index"],
                         special_tokens_mask=special, word_start_mask=starts_at)

    rows = [[int(t) for t in row] for row in ids]
    table_size = max([vocab_size] + [t + 1 for t in case["ids"]])
    # Ids past the vocabulary are ordinary, word-starting tokens; a given special_tokens_mask replaces
    # the id-based specials (it folds into attention).
    eligible = [int(special is not None or i not in specials) for i in range(table_size)]
    word_starts = None if case["word_starts"] is None else case["word_starts"] + [True] * (table_size - vocab_size)
    if special is not None:
        attention = (special == 0) if attention is None else (attention != 0) & (special == 0)
    bits = RefBits(np.random.PCG64([case["batch_index"], case["epoch"], case["seed"]]))
    expected_out, expected_labels = ref_mask(
        rows, None if attention is None else attention.astype(int).tolist(), bits, eligible=eligible,
        word_starts=word_starts, word_starts_at=None if starts_at is None else starts_at.tolist(), pool=pool,
        mask_id=case["mask_id"], mode=case["mode"], p=case["p"], mask_replace_prob=case["mask_replace"],
        random_replace_prob=case["random_replace"], span_p=case["span"].p, span_max=case["span"].max_length,
    )
    assert out.dtype == np.int64 and labels.dtype == np.int64
    assert out.shape == labels.shape == shape
    assert out.tolist() == expected_out
    assert labels.tolist() == expected_labels


# --- statistics over a large batch (fixed seeds, binomial tolerances) ----------------------------------

VOCAB, SPECIALS, MASK = 1000, [0, 1, 2, 3], 3


@pytest.fixture(scope="module")
def big_batch():
    rng = np.random.default_rng(1234)
    ids = rng.integers(0, VOCAB, size=(128, 512)).astype(np.int32)
    attention = np.ones_like(ids)
    lengths = rng.integers(200, 513, size=128)
    attention[np.arange(512)[None, :] >= lengths[:, None]] = 0
    ids[attention == 0] = 1  # padding id
    return ids, attention


def test_selection_and_replacement_rates(big_batch):
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=7)
    out, labels = masker(ids, attention, batch_index=3)
    eligible = (attention == 1) & ~np.isin(ids, SPECIALS)
    selected = labels != IGNORE_INDEX
    n_eligible, n_selected = int(eligible.sum()), int(selected.sum())
    assert binomial_ok(n_selected, n_eligible, 0.15)
    # Never a special, never padding, labels are the original ids.
    assert not (selected & ~eligible).any()
    assert (labels[selected] == ids[selected]).all()
    assert (out[~selected] == ids[~selected]).all()
    masked = out[selected] == MASK
    kept = out[selected] == ids[selected]
    randomised = ~masked & ~kept
    assert binomial_ok(int(masked.sum()), n_selected, 0.8)
    # A random draw may hit the original id (1 in 996): it then counts as kept.
    assert binomial_ok(int(randomised.sum()), n_selected, 0.1 * (1 - 1 / 996))
    assert binomial_ok(int(kept.sum()), n_selected, 0.1 + 0.1 / 996)
    assert not np.isin(out[selected][randomised], SPECIALS).any()
    # Random ids are uniform over the 996 non-special ids: every decile of the vocabulary gets its share.
    random_ids = out[selected][randomised]
    counts = np.histogram(random_ids, bins=10, range=(0, VOCAB))[0]
    shares = np.array([(VOCAB // 10 - (4 if b == 0 else 0)) / 996 for b in range(10)])
    for count, share in zip(counts, shares):
        assert binomial_ok(int(count), random_ids.size, share)


@pytest.mark.parametrize("mask_replace, random_replace", [(1.0, 0.0), (0.5, 0.5), (0.0, 0.0), (0.6, 0.2)])
def test_replacement_probabilities_are_fractions_of_the_selected(big_batch, mask_replace, random_replace):
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mask_replace_prob=mask_replace,
                    random_replace_prob=random_replace)
    out, labels = masker(ids, attention)
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    n_masked = int((out[selected] == MASK).sum())
    n_kept = int((out[selected] == ids[selected]).sum())
    assert binomial_ok(n_masked, n, mask_replace)
    assert binomial_ok(n - n_masked - n_kept, n, random_replace * (1 - 1 / 996))


@pytest.mark.parametrize("p", [0.0, 0.15, 0.4, 1.0])
def test_exact_mode_selects_round_p_times_eligible_per_row(big_batch, p):
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=p, exact=True)
    _, labels = masker(ids, attention)
    eligible = ((attention == 1) & ~np.isin(ids, SPECIALS)).sum(axis=1)
    assert ((labels != IGNORE_INDEX).sum(axis=1) == np.floor(p * eligible + 0.5)).all()


@pytest.mark.parametrize("p", [0.001, 0.0002])
def test_small_p_gaps_beyond_the_table_match_reference_and_rate(big_batch, p):
    """Below p ~ 0.005 gaps outgrow the 4096-entry table and continue from fresh draws."""
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=p, seed=2)
    _, labels = masker(ids, attention)
    eligible = [int(i not in SPECIALS) for i in range(VOCAB)]
    expected_out, expected_labels = ref_mask(
        ids.tolist(), attention.tolist(), RefBits(np.random.PCG64([0, 0, 2])), eligible=eligible, word_starts=None,
        pool=[i for i in range(VOCAB) if eligible[i]], mask_id=MASK, mode="bernoulli", p=p,
        mask_replace_prob=0.8, random_replace_prob=0.1)
    assert labels.tolist() == expected_labels
    n_eligible = int(((attention == 1) & ~np.isin(ids, SPECIALS)).sum())
    n_selected = sum(int((masker(ids, attention, batch_index=b)[1] != IGNORE_INDEX).sum()) for b in range(20))
    assert binomial_ok(n_selected, 20 * n_eligible, p)


def test_p_zero_and_one(big_batch):
    ids, attention = big_batch
    eligible = (attention == 1) & ~np.isin(ids, SPECIALS)
    for p, expected in ((0.0, np.zeros_like(eligible)), (1.0, eligible)):
        _, labels = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=p)(ids, attention)
        assert ((labels != IGNORE_INDEX) == expected).all()


def test_span_lengths_follow_the_truncated_geometric():
    from fastlm.masking import _k, _threshold

    span = Span(p=0.2, max_length=10)
    lengths = np.empty(200_000, dtype=np.int64)
    _k.span_lengths(np.random.PCG64(5), _threshold(span.p), span.max_length, lengths)
    pmf = np.array([span.p * (1 - span.p) ** (k - 1) for k in range(1, 11)])
    pmf /= pmf.sum()
    counts = np.bincount(lengths, minlength=12)
    assert counts[0] == 0 and counts[11:].sum() == 0
    for k in range(1, 11):
        assert binomial_ok(int(counts[k]), lengths.size, pmf[k - 1])
    assert abs(lengths.mean() - (pmf * np.arange(1, 11)).sum()) < 0.02  # SpanBERT's mean 3.8


def test_span_masking_masks_contiguous_runs_up_to_the_budget(big_batch):
    ids, attention = big_batch
    ids = ids.copy()
    ids[:, 0] = 0  # a leading special token on every row
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, span=Span(0.2, 10), mask_replace_prob=1.0,
                    random_replace_prob=0.0)
    _, labels = masker(ids, attention)
    eligible = (attention == 1) & ~np.isin(ids, SPECIALS)
    selected = labels != IGNORE_INDEX
    budgets = np.floor(0.15 * eligible.sum(axis=1) + 0.5)
    assert (selected.sum(axis=1) >= budgets).all()
    assert (selected.sum(axis=1) <= budgets + 10).all()  # the last span may overshoot by < max_length
    # Runs of selected tokens are longer than Bernoulli's (mean ~1.2): spans of mean 3.8, some merged.
    starts = selected & ~np.concatenate([np.zeros((selected.shape[0], 1), bool), selected[:, :-1]], axis=1)
    assert selected.sum() / starts.sum() > 3.0
    assert not (selected & ~eligible).any()


# --- whole words on real tokenizers ----------------------------------------------------------------------

def _word_groups(tokens_row, labels_row, units):
    return [[labels_row[i] != IGNORE_INDEX for i in unit] for unit in units]


@pytest.mark.parametrize("tokenizer_fixture, scheme", [("bert_tok", "wordpiece"), ("roberta_tok", "bpe")])
def test_whole_word_masks_every_piece_of_a_selected_word(request, tokenizer_fixture, scheme):
    tok = request.getfixturevalue(tokenizer_fixture)
    lines = [line for line in wikitext_lines("valid")[:400] if line][:64]
    enc = tok(lines, padding="max_length", truncation=True, max_length=128, return_tensors="np",
              return_offsets_mapping=True)
    masker = Masker.from_tokenizer(tok, whole_word="auto", mlm_probability=0.3)
    assert masker.whole_word == scheme
    _, labels = masker(enc["input_ids"], enc["attention_mask"], batch_index=1)

    eligible = masker.eligible.astype(bool)
    n_multi_piece_selected = 0
    for r in range(len(lines)):
        units = ref_units(enc["input_ids"][r].tolist(), enc["attention_mask"][r].tolist(), eligible, masker.word_starts)
        for flags in _word_groups(enc["input_ids"][r], labels[r], units):
            assert all(flags) or not any(flags)
            n_multi_piece_selected += len(flags) > 1 and flags[0]
    assert n_multi_piece_selected > 20  # the property was exercised on real multi-piece words


@pytest.mark.parametrize("tokenizer_fixture", ["bert_tok", "roberta_tok"])
def test_word_table_agrees_with_hf_offset_words(request, tokenizer_fixture):
    """Our per-vocabulary word starts vs the words HF's whole-word masking derives from offsets.

    Byte-level BPE: the same words (bar HF splitting multi-byte characters). WordPiece: ours split where a token is not a ``##`` continuation
    (original BERT whole-word masking: "word" and "," are two words), HF's only at whitespace, so each
    of our words lies inside one of HF's.
    """
    from transformers import DataCollatorForLanguageModeling

    tok = request.getfixturevalue(tokenizer_fixture)
    lines = [line for line in wikitext_lines("valid")[:300] if line][:40]
    enc = tok(lines, padding="max_length", truncation=True, max_length=96, return_tensors="np",
              return_offsets_mapping=True, return_special_tokens_mask=True)
    word_ids, _ = DataCollatorForLanguageModeling._calc_word_ids_and_prob_mask(
        enc["offset_mapping"], enc["special_tokens_mask"])
    masker = Masker.from_tokenizer(tok, whole_word="auto")
    for r in range(len(lines)):
        units = ref_units(enc["input_ids"][r].tolist(), enc["attention_mask"][r].tolist(),
                          masker.eligible.astype(bool), masker.word_starts)
        hf = {}
        for i, w in enumerate(word_ids[r]):
            if w >= 0 and enc["attention_mask"][r][i]:
                hf.setdefault(w, []).append(i)
        hf_words = sorted(hf.values())
        if masker.whole_word == "bpe":
            # HF splits a character whose bytes span two tokens (equal offsets, so "a gap"); ours keeps it.
            offsets = enc["offset_mapping"][r]
            merged = []
            for word in hf_words:
                if merged and offsets[word[0]][0] < offsets[word[0] - 1][1] and merged[-1][-1] == word[0] - 1:
                    merged[-1] = merged[-1] + word
                else:
                    merged.append(word)
            assert units == merged
        else:
            assert all(len({word_ids[r][i] for i in unit}) == 1 for unit in units)
            assert sum(map(len, units)) == sum(map(len, hf_words))


# --- the RoBERTa vocabulary with holes ------------------------------------------------------------------

def test_random_ids_come_from_existing_non_special_ids(roberta_tok):
    masker = Masker.from_tokenizer(roberta_tok, mask_replace_prob=0.0, random_replace_prob=1.0, mlm_probability=1.0)
    assert masker.vocab_size == 50265  # ids reach <mask> = 50264 though the file has 50262 entries
    assert not np.isin([50261, 50262, 50263], masker.pool).any()
    assert not np.isin(roberta_tok.all_special_ids, masker.pool).any()
    ids = np.full((64, 512), 1000, dtype=np.int64)
    out, labels = masker(ids)
    assert (labels == 1000).all()
    assert np.isin(out, masker.pool).all()
    assert out.max() <= 50260


# --- reproducibility ---------------------------------------------------------------------------------

def test_stream_is_keyed_by_seed_epoch_and_batch_index(big_batch):
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=11)
    first = masker(ids, attention, epoch=2, batch_index=5)
    again = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=11)(ids, attention, epoch=2, batch_index=5)
    assert all((a == b).all() for a, b in zip(first, again))
    for kwargs in (dict(epoch=3, batch_index=5), dict(epoch=2, batch_index=6)):
        assert not (masker(ids, attention, **kwargs)[1] == first[1]).all()
    other_seed = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=12)
    assert not (other_seed(ids, attention, epoch=2, batch_index=5)[1] == first[1]).all()


def test_golden_sha256_of_a_fixed_batch(roberta_tok):
    """Pins the stream, the draw order and the semantics: any change to them must change this hash."""
    lines = [line for line in wikitext_lines("valid")[:200] if line][:16]
    enc = roberta_tok(lines, padding="max_length", truncation=True, max_length=64, return_tensors="np")
    digests = []
    for kwargs in (dict(), dict(exact=True), dict(whole_word="bpe"), dict(span=True)):
        out, labels = Masker.from_tokenizer(roberta_tok, seed=42, **kwargs)(
            enc["input_ids"], enc["attention_mask"], epoch=1, batch_index=9)
        digests.append(hashlib.sha256(out.tobytes() + labels.tobytes()).hexdigest()[:16])
    assert digests == GOLDEN


# Recorded from the kernel once it matched tests/reference.py's ref_mask (bernoulli, exact, whole-word, span).
GOLDEN = ['e7b6b42933db0256', '4467a6b6a19c2e85', 'ed2687e2c2797996', 'b6a61627e92cc1f1']


def test_fixed_masks_depend_only_on_each_row(big_batch):
    ids, attention = big_batch
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=3)
    out, labels = masker.mask_fixed(ids[:8], attention[:8])
    # Other batch mates, another order, more padding: the same row gets the same mask.
    order = np.array([5, 2, 7])
    wider_ids = np.concatenate([ids[order], np.ones((3, 40), ids.dtype)], axis=1)
    wider_attention = np.concatenate([attention[order], np.zeros((3, 40), attention.dtype)], axis=1)
    out2, labels2 = masker.mask_fixed(wider_ids, wider_attention)
    assert (labels2[:, :512] == labels[order]).all() and (out2[:, :512] == out[order]).all()
    assert (labels2[:, 512:] == IGNORE_INDEX).all()
    assert not (labels[0] == labels[1]).all()


# --- API and bad input ---------------------------------------------------------------------------------

def test_torch_in_torch_out_and_input_untouched(big_batch):
    torch = pytest.importorskip("torch")
    ids, attention = big_batch
    tensor = torch.from_numpy(ids.astype(np.int64))
    before = tensor.clone()
    out, labels = mask_tokens(tensor, torch.from_numpy(attention), vocab_size=VOCAB, mask_id=MASK,
                              special_ids=SPECIALS, seed=1, batch_index=2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64 and labels.dtype == torch.int64
    assert torch.equal(tensor, before)
    expected = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, seed=1)(ids, attention, batch_index=2)
    assert (out.numpy() == expected[0]).all() and (labels.numpy() == expected[1]).all()


def test_mask_tokens_with_a_generator_advances_it(big_batch):
    ids, _ = big_batch
    rng = np.random.default_rng(0)
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    first = mask_tokens(ids[:4], rng=rng, **kwargs)[1]
    second = mask_tokens(ids[:4], rng=rng, **kwargs)[1]
    assert not (first == second).all()
    assert (mask_tokens(ids[:4], rng=np.random.default_rng(0), **kwargs)[1] == first).all()


def test_bad_input_raises_clear_errors(roberta_tok, gpt2_tok):
    ok = dict(vocab_size=100, mask_id=4, special_ids=[0, 1])
    with pytest.raises(ValueError, match="no mask id"):
        Masker(vocab_size=100, mask_id=None, special_ids=[0])
    with pytest.raises(ValueError, match="no mask id"):
        Masker.from_tokenizer(gpt2_tok)
    for name in ("mlm_probability", "mask_replace_prob", "random_replace_prob"):
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=name):
                Masker(**ok, **{name: bad})
    with pytest.raises(ValueError, match="must not exceed 1"):
        Masker(**ok, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ValueError, match="mask_id 100 is outside"):
        Masker(vocab_size=100, mask_id=100, special_ids=[])
    with pytest.raises(ValueError, match="word_starts"):
        Masker(**ok, whole_word="bpe")
    with pytest.raises(ValueError, match="exact"):
        Masker(**ok, span=True, exact=True)
    with pytest.raises(ValueError, match="no id to draw random replacements from: pass random_replace_prob=0"):
        Masker(vocab_size=3, mask_id=2, special_ids=[0, 1])
    with pytest.raises(TypeError, match="special_ids must be a collection of ids"):
        Masker(vocab_size=100, mask_id=4, special_ids=5)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 2\*\*24\]"):
        Masker(vocab_size=2**32 - 1, mask_id=4, special_ids=[])  # 4 GB of per-id tables before

    masker = Masker(**ok)
    ids = np.zeros((2, 5), dtype=np.int64)
    for bad_value, where in ((100, "input_ids\\[1, 3\\] = 100"), (-1, "input_ids\\[1, 3\\] = -1")):
        bad = ids.copy()
        bad[1, 3] = bad_value
        with pytest.raises(ValueError, match=where + " is outside the vocabulary"):
            masker(bad)
    for dtype in (np.float32, np.int8, np.uint64):
        with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype)} is not supported"):
            masker(ids.astype(dtype))
    with pytest.raises(ValueError, match="2-D"):
        masker(ids[0])
    with pytest.raises(ValueError, match="C-contiguous"):
        masker(ids[:, ::2])
    with pytest.raises(TypeError, match="numpy array"):
        masker([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        masker(ids, np.ones((2, 4)))
    with pytest.raises(ValueError, match="batch_index"):
        masker(ids, batch_index=-1)


def test_probabilities_too_small_for_32_bit_draws_are_refused():
    """Below 2**-32 the gap table never decays and the kernel would loop for ~2**50 draws."""
    with pytest.raises(ValueError, match=r"at least 2\*\*-32"):
        Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=1e-15)
    masker = Masker(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=2**-31)
    _, labels = masker(np.full((2, 64), 7, dtype=np.int64))
    assert (labels == IGNORE_INDEX).all()


def test_span_p_too_small_to_finish_is_refused():
    """Lengths past max_length are redrawn, so one costs ~1/p draws in a kernel that ignores Ctrl-C:
    p = 1e-12 spun forever, 1e-9 took 7.8 s for a 4 x 16 batch."""
    ok = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    for p in (1e-12, 1e-9, 0.99e-4):
        with pytest.raises(ValueError, match=r"Span.p must be at least 0.0001"):
            Masker(**ok, span=Span(p=p))
    for bad in (0.0, -0.5, float("nan"), 1.5):
        with pytest.raises(ValueError, match="Span.p"):
            Masker(**ok, span=Span(p=bad))
    with pytest.raises(TypeError, match="Span.p"):
        Masker(**ok, span=Span(p="0.2"))
    with pytest.raises(ValueError, match=r"Span.max_length must be an int in \[1, 2\*\*63\)"):
        Masker(**ok, span=Span(max_length=2**63))
    # At the floor a span costs ~1e4 draws: the batch is masked, up to its budget.
    _, labels = Masker(**ok, span=Span(p=1e-4, max_length=10))(np.full((4, 16), 7, dtype=np.int64))
    assert ((labels != IGNORE_INDEX).sum(axis=1) >= round(0.15 * 16)).all()


def test_float_tensor_that_requires_grad_gets_the_float_ids_error(roberta_tok):
    """Issue 18 row 7: the dtype is checked before the tensor becomes a numpy array, so a float tensor
    that requires grad is refused in fastlm's words, not with torch's "Can't call numpy()"."""
    torch = pytest.importorskip("torch")
    masker = Masker.from_tokenizer(roberta_tok)
    for tensor in (torch.zeros(4, 16, requires_grad=True), torch.zeros(4, 16, dtype=torch.bfloat16),
                   torch.zeros(4, 16, dtype=torch.bool)):
        with pytest.raises(TypeError, match=r"input_ids dtype \w+ is not supported; use one of uint16"):
            masker(tensor)


def test_mask_tokens_rng_takes_what_default_rng_takes(big_batch):
    """Issue 16 item 4: one rng argument. An int is the seed of the keyed stream (what seed= was, and
    still is), None is seed 0, a Generator is drawn from; anything else is refused by name."""
    ids, _ = big_batch
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    keyed = Masker(**kwargs, seed=7)(ids[:4], epoch=1, batch_index=3)[1]
    assert (mask_tokens(ids[:4], rng=7, epoch=1, batch_index=3, **kwargs)[1] == keyed).all()
    assert (mask_tokens(ids[:4], seed=7, epoch=1, batch_index=3, **kwargs)[1] == keyed).all()
    assert (mask_tokens(ids[:4], **kwargs)[1] == Masker(**kwargs)(ids[:4])[1]).all()
    bit_generator = np.random.PCG64(5)
    assert (mask_tokens(ids[:4], rng=bit_generator, **kwargs)[1]
            == mask_tokens(ids[:4], rng=np.random.Generator(np.random.PCG64(5)), **kwargs)[1]).all()
    for bad in (-1, 2.5, "7", True):
        with pytest.raises(TypeError, match="rng must be a numpy Generator or BitGenerator, a non-negative int seed"):
            mask_tokens(ids[:4], rng=bad, **kwargs)
    with pytest.raises(TypeError, match="pass rng or seed, not both"):
        mask_tokens(ids[:4], rng=1, seed=1, **kwargs)
