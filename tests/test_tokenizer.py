"""fastlm.tokenizer: which tokenizers are byte-level BPE with GPT-2's split, the tiktoken encoding built
from their own files (ranks mapped to the vocabulary's ids), and the template around every text."""
import json

import pytest

from fastlm.tokenizer import GPT2_SPLIT_PATTERN, byte_level_bpe_problem, template_ids, tiktoken_encoding


def with_changes(tok, **changes):
    spec = json.loads(tok.backend_tokenizer.to_str())
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        target = spec
        for part in path:
            target = target[part]
        target[key] = value
    return json.dumps(spec)


def test_gpt2_roberta_and_trained_bpe_qualify_wordpiece_does_not(gpt2_tok, roberta_tok, bert_tok):
    from fastlm.tokenizer import train_bpe_tokenizer

    trained = train_bpe_tokenizer([["hello world", "tokenizers are fun"]], 300)
    assert [byte_level_bpe_problem(t) for t in (gpt2_tok, roberta_tok, trained)] == [None, None, None]
    assert byte_level_bpe_problem(bert_tok) == "it is a WordPiece tokenizer, not a byte-level BPE"


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"normalizer": {"type": "NFC"}}, "normalizes"),
        ({"pre_tokenizer__add_prefix_space": True}, "pre-tokenizer"),
        ({"pre_tokenizer__use_regex": False}, "pre-tokenizer"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer"),
        ({"model__byte_fallback": True}, "byte fallback"),
        ({"model__dropout": 0.1}, "dropout"),
    ],
)
def test_what_disqualifies_a_byte_level_bpe(gpt2_tok, changes, problem):
    assert problem in byte_level_bpe_problem(with_changes(gpt2_tok, **changes))
    with pytest.raises(ValueError, match="tiktoken cannot reproduce this tokenizer"):
        tiktoken_encoding(with_changes(gpt2_tok, **changes))


def test_gpt2_split_written_as_a_split_pre_tokenizer_qualifies(gpt2_tok):
    # The form newer tokenizer.json files use: Split(GPT-2's regex) then ByteLevel(use_regex=False).
    sequence = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}
    assert byte_level_bpe_problem(with_changes(gpt2_tok, pre_tokenizer=sequence)) is None
    sequence["pretokenizers"][0]["pattern"] = {"Regex": r"\s+|\S+"}
    assert byte_level_bpe_problem(with_changes(gpt2_tok, pre_tokenizer=sequence)) is not None


def test_an_added_token_that_eats_following_whitespace_disqualifies(roberta_tok):
    spec = json.loads(roberta_tok.backend_tokenizer.to_str())
    spec["added_tokens"][-1]["rstrip"] = True
    assert "rstrip" in byte_level_bpe_problem(json.dumps(spec))


def test_ranks_map_to_the_vocabularys_own_ids(gpt2_tok, roberta_tok):
    # RoBERTa renumbers GPT-2's tokens: the same ranks, different ids.
    text = "Hello world, it's 2024 😀"
    gpt2, roberta = tiktoken_encoding(gpt2_tok), tiktoken_encoding(roberta_tok)
    ranks = gpt2.encoding.encode_ordinary(text)
    assert roberta.encoding.encode_ordinary(text) == ranks
    assert gpt2.ids[ranks].tolist() == gpt2_tok(text)["input_ids"]
    assert roberta.ids[ranks].tolist() == roberta_tok(text, add_special_tokens=False)["input_ids"]
    assert gpt2.ids[ranks].tolist() != roberta.ids[ranks].tolist()


def test_added_tokens_are_tiktoken_special_tokens_and_extras_come_last(roberta_tok):
    bpe = tiktoken_encoding(roberta_tok, ["<extra>"])
    ranks = bpe.encoding.encode("a<mask> b</s>", allowed_special="all")
    assert bpe.ids[ranks].tolist() == roberta_tok("a<mask> b</s>", add_special_tokens=False)["input_ids"]
    assert bpe.ids[ranks[1]] == 50264 and bpe.ids[ranks[-1]] == 2
    assert bpe.encoding.encode("<extra>", allowed_special="all") == [len(bpe.ids)]


def test_merges_that_leave_the_vocabulary_are_refused(gpt2_tok):
    spec = json.loads(gpt2_tok.backend_tokenizer.to_str())
    del spec["model"]["vocab"]["Ġthe"]
    with pytest.raises(ValueError, match="'Ġthe'.*not in its vocabulary"):
        tiktoken_encoding(json.dumps(spec))


def test_template_ids(gpt2_tok, roberta_tok, bert_tok):
    assert template_ids(gpt2_tok) == ([], [])
    assert template_ids(roberta_tok) == ([0], [2])
    assert template_ids(bert_tok) == ([101], [102])
