"""transformers' collator tests (tests/trainer/test_data_collator.py, transformers 5), rewritten for fastlm.

Pointed at fastlm: ``DataCollatorForLanguageModeling`` -> :class:`fastlm.DataCollatorForMLM` (same
arguments; ``mlm=False`` gives causal-LM batches), ``DataCollatorForWholeWordMask`` (transformers 4's name)
-> ``DataCollatorForMLM(whole_word_mask=True)``, ``DataCollatorWithFlattening`` ->
``DataCollatorForCLM(padding_free=True)``. The toy tokenizer is transformers' own: a WordPiece vocabulary of
the five specials only, fed ids up to 1000 (transformers takes any id; so does fastlm's collator).

Of transformers' 38 tests for these collators, 36 pass unchanged (only the collator class swapped) and 2
are adapted: its unit tests of two private whole-word helpers (``_calc_word_ids_and_prob_mask``,
``_whole_word_mask``) become one test of the same cases through fastlm's public whole-word masking.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import BertTokenizer, BertTokenizerFast, set_seed  # noqa: E402

from fastlm import DataCollatorForCLM, DataCollatorForMLM  # noqa: E402

DataCollatorForLanguageModeling = DataCollatorForMLM


def DataCollatorWithFlattening(**kwargs):  # noqa: N802 - transformers' name, pointed at fastlm
    return DataCollatorForCLM(padding_free=True, **kwargs)


def DataCollatorForWholeWordMask(tokenizer, **kwargs):  # noqa: N802
    return DataCollatorForMLM(tokenizer, whole_word_mask=True, **kwargs)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "vocab.txt"
    path.write_text("".join(token + "\n" for token in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]))
    return str(path)


def check_immutability(collator, features):
    """The collator must not change the features it is given."""
    original = copy.deepcopy(features)
    collator(features)
    for before, after in zip(original, features):
        for key in before:
            if isinstance(before[key], (np.ndarray, torch.Tensor)):
                assert before[key].tolist() == after[key].tolist()
            else:
                assert before[key] == after[key]


# --- DataCollatorWithFlattening ----------------------------------------------------------------------------

def flattening_features():
    return [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21, 22, 23, 24, 25]},
            {"input_ids": [30, 31, 32, 33, 34, 35, 36]}]


def test_flattening_basic():
    batch = DataCollatorWithFlattening(return_tensors="pt")(flattening_features())
    assert batch["input_ids"].shape == torch.Size([1, 16])
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34, 35, 36]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]
    for key in ["attention_mask", "cu_seq_lens_k", "cu_seq_lens_q", "seq_idx"]:
        assert key not in batch


def test_flattening_flash_attn_kwargs():
    batch = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(flattening_features())
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 9, 16]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 9, 16]
    assert batch["max_length_k"] == 7
    assert batch["max_length_q"] == 7


def test_flattening_seq_idx():
    batch = DataCollatorWithFlattening(return_tensors="pt", return_seq_idx=True)(flattening_features())
    assert batch["seq_idx"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_flattening_with_labels():
    features = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([10, 11, 12])},
                {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([13, 14])}]
    collator = DataCollatorWithFlattening(return_tensors="pt")
    batch = collator(features)
    assert batch["input_ids"].shape == (1, 5)
    assert batch["labels"].shape == (1, 5)
    features = [{"input_ids": [1, 2, 3], "labels": [10, 11, 12]}, {"input_ids": [4, 5], "labels": [13, 14]}]
    assert collator(features)["labels"].shape == (1, 5)


def test_flattening_numpy_output():
    batch = DataCollatorWithFlattening(return_tensors="np")(flattening_features())
    assert batch["input_ids"].shape == (1, 16)
    assert batch["position_ids"].shape == (1, 16)


def test_flattening_numpy_flash_attn_kwargs():
    batch = DataCollatorWithFlattening(return_tensors="np", return_flash_attn_kwargs=True)(flattening_features())
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 9, 16]
    assert batch["max_length_k"] == 7


def test_flattening_immutability():
    for return_tensors in ["pt", "np"]:
        check_immutability(DataCollatorWithFlattening(return_tensors=return_tensors), flattening_features())


# --- DataCollatorForLanguageModeling -----------------------------------------------------------------------

def test_clm_mode(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": list(range(10))}] * 2)
    assert batch["input_ids"].shape == torch.Size([2, 10])
    assert batch["labels"].shape == torch.Size([2, 10])


def test_clm_with_padding(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    features = [{"input_ids": list(range(5))}, {"input_ids": list(range(10))}]
    assert DataCollatorForLanguageModeling(tokenizer, mlm=False)(features)["input_ids"].shape == torch.Size([2, 10])


def test_clm_pad_to_multiple_of(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=8)
    assert collator([{"input_ids": list(range(10))}] * 2)["input_ids"].shape == torch.Size([2, 16])


def assert_masked_only_at_targets(batch, tokenizer):
    masked_tokens = batch["input_ids"] == tokenizer.mask_token_id
    assert bool(masked_tokens.any())
    assert all(x == -100 for x in batch["labels"][~masked_tokens].tolist())


def test_mlm_mode(vocab_file):
    set_seed(42)
    tokenizer = BertTokenizer(vocab_file)
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=True)([{"input_ids": list(range(10))}] * 2)
    assert batch["input_ids"].shape == torch.Size([2, 10])
    assert batch["labels"].shape == torch.Size([2, 10])
    assert_masked_only_at_targets(batch, tokenizer)


def test_mlm_with_padding(vocab_file):
    set_seed(42)
    tokenizer = BertTokenizer(vocab_file)
    features = [{"input_ids": list(range(5))}, {"input_ids": list(range(10))}]
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=True)(features)
    assert batch["input_ids"].shape == torch.Size([2, 10])
    assert_masked_only_at_targets(batch, tokenizer)


def test_mlm_pad_to_multiple_of(vocab_file):
    set_seed(42)
    tokenizer = BertTokenizer(vocab_file)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, pad_to_multiple_of=8)
    batch = collator([{"input_ids": list(range(10))}] * 2)
    assert batch["input_ids"].shape == torch.Size([2, 16])
    assert_masked_only_at_targets(batch, tokenizer)


def test_with_raw_list_features(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    assert collator([list(range(10)), list(range(10))])["input_ids"].shape == torch.Size([2, 10])
    assert collator([list(range(5)), list(range(10))])["input_ids"].shape == torch.Size([2, 10])


def test_mlm_seed_reproducibility(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    features = [{"input_ids": list(range(1000))}, {"input_ids": list(range(1000))}]
    batch1 = DataCollatorForLanguageModeling(tokenizer, seed=42)(features)
    batch2 = DataCollatorForLanguageModeling(tokenizer, seed=42)(features)
    assert torch.all(batch1["input_ids"] == batch2["input_ids"])
    assert torch.all(batch1["labels"] == batch2["labels"])
    batch3 = DataCollatorForLanguageModeling(tokenizer, seed=43)(features)
    assert not torch.all(batch1["input_ids"] == batch3["input_ids"])


def test_mlm_multiworker_dataloader(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    features = [{"input_ids": list(range(1000))} for _ in range(10)]
    dataloader = torch.utils.data.DataLoader(
        features, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(42),
        collate_fn=DataCollatorForLanguageModeling(tokenizer, seed=42),
    )
    assert torch.stack([batch["input_ids"] for batch in dataloader]).shape == torch.Size([5, 2, 1000])


def test_missing_pad_token_error(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    tokenizer.pad_token = None
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    with pytest.raises(ValueError):
        collator([{"input_ids": list(range(5))}, {"input_ids": list(range(10))}])


def test_numpy_output(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="np")
    batch = collator([{"input_ids": list(range(10))}] * 2)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["labels"].shape == (2, 10)


def test_numpy_mlm(vocab_file):
    set_seed(42)
    tokenizer = BertTokenizer(vocab_file)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, return_tensors="np")
    batch = collator([{"input_ids": list(range(10))}] * 2)
    assert np.any(batch["input_ids"] == tokenizer.mask_token_id)


def test_immutability(vocab_file):
    tokenizer = BertTokenizer(vocab_file)
    for return_tensors in ["pt", "np"]:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors=return_tensors)
        check_immutability(collator, [{"input_ids": list(range(10))}, {"input_ids": list(range(10))}])


# Adapted: transformers tests its private helpers _calc_word_ids_and_prob_mask and _whole_word_mask on
# these tables; fastlm has no such helpers, so the same offsets and special-token masks go through the
# public whole-word masking, which must select exactly transformers' expected words, whole.
HF_OFFSETS = np.array([
    [(0, 0), (0, 3), (3, 4), (5, 6), (6, 7), (8, 9)],
    [(0, 0), (0, 3), (3, 4), (5, 6), (6, 7), (0, 0)],
    [(0, 0), (0, 3), (3, 4), (0, 0), (6, 7), (0, 0)],
    [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)],
    [(1, 1), (2, 2), (3, 4), (5, 6), (7, 8), (9, 10)],
    [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0)],
])
HF_SPECIAL = np.array([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1], [1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
HF_WORD_IDS = np.array([[-1, 1, 1, 2, 2, 3], [-1, 1, 1, 2, 2, -1], [-1, 1, 1, -1, 2, -1], [1, 1, 1, 1, 1, 1],
                        [1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, -1, -1]])


def test_calc_word_ids_and_whole_word_mask_through_the_collator(vocab_file):
    tokenizer = BertTokenizerFast(vocab_file)
    features = [{"input_ids": [5 + i for i in range(6)], "offset_mapping": [tuple(p) for p in offsets],
                 "special_tokens_mask": special.tolist()} for offsets, special in zip(HF_OFFSETS, HF_SPECIAL)]
    collator = DataCollatorForWholeWordMask(tokenizer, mlm_probability=0.5, seed=0, return_tensors="np")
    seen = set()
    for _ in range(40):
        targets = collator(features)["labels"] != -100
        for r in range(len(features)):
            assert not targets[r][HF_WORD_IDS[r] < 0].any()  # specials never
            for word in set(HF_WORD_IDS[r][HF_WORD_IDS[r] >= 0].tolist()):
                flags = targets[r][HF_WORD_IDS[r] == word]
                assert flags.all() or not flags.any(), (r, word)
                if flags.all():
                    seen.add((r, word))
    assert len(seen) == sum(len(set(w[w >= 0].tolist())) for w in HF_WORD_IDS)  # every word was selected


# --- DataCollatorForWholeWordMask --------------------------------------------------------------------------

def whole_word_tokenizer_and_features(vocab_file, n_tokens=8, n_features=2, **convert):
    tokenizer = BertTokenizerFast(vocab_file)
    input_tokens = [f"token_{i}" for i in range(n_tokens)]
    tokenizer.add_tokens(input_tokens)
    features = [tokenizer(" ".join(input_tokens), return_offsets_mapping=True) for _ in range(n_features)]
    if convert:
        features = [f.convert_to_tensors(convert["to"]) for f in features]
    return tokenizer, features


def test_whole_word_basic(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file)
    batch = DataCollatorForWholeWordMask(tokenizer, return_tensors="pt")(features)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["labels"].shape == (2, 10)


def test_whole_word_with_numpy_inputs(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file, to="np")
    batch = DataCollatorForWholeWordMask(tokenizer, return_tensors="pt")(features)
    assert batch["input_ids"].shape == torch.Size((2, 10))


def test_whole_word_with_tensor_inputs(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file, to="pt")
    batch = DataCollatorForWholeWordMask(tokenizer, return_tensors="pt")(features)
    assert batch["input_ids"].shape == torch.Size((2, 10))


def test_whole_word_seed_reproducibility(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file, n_tokens=998)
    batch1 = DataCollatorForWholeWordMask(tokenizer, seed=42, return_tensors="np")(features)
    batch2 = DataCollatorForWholeWordMask(tokenizer, seed=42, return_tensors="np")(features)
    np.testing.assert_array_equal(batch1["input_ids"], batch2["input_ids"])
    batch3 = DataCollatorForWholeWordMask(tokenizer, seed=43, return_tensors="np")(features)
    assert not np.all(batch1["input_ids"] == batch3["input_ids"])


def test_whole_word_seed_multiworker_dataloader(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file, n_tokens=998, n_features=10)

    def batches(seed, **loader_kwargs):
        loader = torch.utils.data.DataLoader(features, batch_size=2, num_workers=2, **loader_kwargs,
                                             collate_fn=DataCollatorForWholeWordMask(tokenizer, seed=seed))
        return torch.stack([batch["input_ids"] for batch in loader])

    batches1 = batches(42, generator=torch.Generator().manual_seed(42))
    assert torch.all(batches1 == batches(42))
    assert not torch.all(batches1 == batches(43))


def test_whole_word_numpy_output(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file)
    batch = DataCollatorForWholeWordMask(tokenizer, return_tensors="np")(features)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["labels"].shape == (2, 10)


def test_whole_word_immutability(vocab_file):
    tokenizer, features = whole_word_tokenizer_and_features(vocab_file)
    features = [dict(f) for f in features]
    for return_tensors in ["pt", "np"]:
        collator = DataCollatorForWholeWordMask(tokenizer, return_tensors=return_tensors)
        check_immutability(collator, copy.deepcopy(features))


# --- next sentence prediction and sentence order prediction features ----------------------------------------

def nsp_features():
    return [{"input_ids": [0, 1, 2, 3, 4], "token_type_ids": [0, 1, 2, 3, 4], "next_sentence_label": i}
            for i in range(2)]


def sop_features(convert=list):
    return [{"input_ids": convert([0, 1, 2, 3, 4]), "token_type_ids": convert([0, 1, 2, 3, 4]),
             "sentence_order_label": i} for i in range(2)]


def test_nsp(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file))(nsp_features())
    assert batch["input_ids"].shape == torch.Size([2, 5])
    assert batch["token_type_ids"].shape == torch.Size([2, 5])
    assert batch["labels"].shape == torch.Size([2, 5])
    assert batch["next_sentence_label"].shape == torch.Size([2])


def test_nsp_with_padding(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), pad_to_multiple_of=8)(nsp_features())
    assert batch["input_ids"].shape == torch.Size([2, 8])
    assert batch["next_sentence_label"].shape == torch.Size([2])


def test_nsp_numpy_output(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), return_tensors="np")(nsp_features())
    assert batch["input_ids"].shape == (2, 5)
    assert batch["next_sentence_label"].shape == (2,)


def test_nsp_immutability(vocab_file):
    for return_tensors in ["pt", "np"]:
        collator = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), return_tensors=return_tensors)
        check_immutability(collator, nsp_features())


def test_sop(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file))(sop_features())
    assert batch["input_ids"].shape == torch.Size([2, 5])
    assert batch["token_type_ids"].shape == torch.Size([2, 5])
    assert batch["labels"].shape == torch.Size([2, 5])
    assert batch["sentence_order_label"].shape == torch.Size([2])


def test_sop_with_tensor_inputs(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file))(sop_features(torch.tensor))
    assert batch["sentence_order_label"].shape == torch.Size([2])


def test_sop_with_padding(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), pad_to_multiple_of=8)(sop_features(torch.tensor))
    assert batch["input_ids"].shape == torch.Size([2, 8])
    assert batch["sentence_order_label"].shape == torch.Size([2])


def test_sop_numpy_output(vocab_file):
    batch = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), return_tensors="np")(sop_features())
    assert batch["input_ids"].shape == (2, 5)
    assert batch["sentence_order_label"].shape == (2,)


def test_sop_immutability(vocab_file):
    for return_tensors in ["pt", "np"]:
        collator = DataCollatorForLanguageModeling(BertTokenizer(vocab_file), return_tensors=return_tensors)
        check_immutability(collator, sop_features())
