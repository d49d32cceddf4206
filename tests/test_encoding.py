"""fastlm.encoding: tiktoken gives the Hugging Face tokenizer's ids (all of WikiText-2 valid + test,
adversarial text), falls back when it cannot, and framing/parallel encoding keep documents intact."""
import json
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import encoding as encoding_module
from fastlm.encoding import Batch, HFEncoder, TiktokenEncoder, choose_encoder, encode_batches
from fastlm.tokenizer import byte_level_bpe_problem
from tests.data import wikitext_lines

# The corners of GPT-2's split and of byte-level BPE, in one alphabet for generated text.
NASTY = "ab Zé1٣ \t\r\n\x0b\x0c\x1c\x85\xa0\u2028\u2029\u3000\u200b'sdtl.,!?-_<>|日本😀👍🏽\u0301\U0001f1eb"


@pytest.fixture(scope="module", params=["gpt2", "roberta"])
def byte_level(request, gpt2_tok, roberta_tok):
    """(tokenizer, its JSON, HF ids of every WikiText-2 valid + test row): the HF side computed once."""
    tok = {"gpt2": gpt2_tok, "roberta": roberta_tok}[request.param]
    rows = wikitext_lines("valid") + wikitext_lines("test")
    return tok, tok.backend_tokenizer.to_str(), rows, tok(rows, add_special_tokens=False)["input_ids"]


def flat(docs):
    return np.fromiter((t for doc in docs for t in doc), np.int64), np.array([len(doc) for doc in docs])


def test_tiktoken_equals_hf_on_all_of_wikitext2(byte_level):
    tok, tokenizer_json, rows, hf_ids = byte_level
    tokens, lengths = TiktokenEncoder(tokenizer_json, np.uint16)(rows)
    expected_tokens, expected_lengths = flat(hf_ids)
    np.testing.assert_array_equal(lengths, expected_lengths)
    np.testing.assert_array_equal(tokens, expected_tokens)
    assert tokens.dtype == np.uint16


def test_special_tokens_and_eos_frame_every_document(byte_level):
    # add_special_tokens (RoBERTa: <s> ... </s>) and --append-eos around every row, as HF's template does.
    from fastlm.tokenizer import template_ids

    tok, tokenizer_json, rows, hf_ids = byte_level
    prefix, suffix = template_ids(tok)
    eos = tok.eos_token_id
    encoder = TiktokenEncoder(tokenizer_json, np.uint16)
    [(tokens, lengths, doc_bytes, open_last)] = encode_batches([Batch(rows)], encoder, prefix=prefix, suffix=[*suffix, eos])
    some = rows[:300]
    with_template = tok(some, add_special_tokens=True)["input_ids"]
    assert with_template == [[*prefix, *ids, *suffix] for ids in hf_ids[:300]]
    expected_tokens, expected_lengths = flat([[*prefix, *ids, *suffix, eos] for ids in hf_ids])
    np.testing.assert_array_equal(lengths, expected_lengths)
    np.testing.assert_array_equal(tokens, expected_tokens)
    assert doc_bytes.tolist() == [len(row.encode()) for row in rows] and not open_last


@pytest.fixture(scope="module")
def gpt2_tiktoken(gpt2_tok):
    return TiktokenEncoder(gpt2_tok.backend_tokenizer.to_str(), np.uint16)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(alphabet=NASTY, max_size=60), min_size=1, max_size=6))
def test_tiktoken_equals_hf_on_generated_text(gpt2_tok, gpt2_tiktoken, texts):
    tokens, lengths = gpt2_tiktoken(texts)
    expected_tokens, expected_lengths = flat(gpt2_tok(texts, add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(lengths, expected_lengths)
    np.testing.assert_array_equal(tokens, expected_tokens)


def test_texts_with_added_tokens_or_the_separator_go_to_hf(roberta_tok):
    # RoBERTa's <mask>/<s> and the separator itself inside a document: the HF tokenizer's rules apply.
    sep = TiktokenEncoder.SEPARATOR
    texts = ["plain text", "a <mask> here</s>", "more plain", f"holds the separator {sep} inside", "", "last"]
    tokens, lengths = TiktokenEncoder(roberta_tok.backend_tokenizer.to_str(), np.uint16)(texts)
    expected_tokens, expected_lengths = flat(roberta_tok(texts, add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(lengths, expected_lengths)
    np.testing.assert_array_equal(tokens, expected_tokens)
    assert 50264 in tokens.tolist()


def test_wordpiece_falls_back_to_hf_quietly_or_refuses(bert_tok):
    tokenizer_json = bert_tok.backend_tokenizer.to_str()
    problem = byte_level_bpe_problem(tokenizer_json)
    assert "WordPiece" in problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder, why = choose_encoder("auto", tokenizer_json, np.uint16, ["some text"], problem)
    assert isinstance(encoder, HFEncoder) and "WordPiece" in why
    with pytest.raises(ValueError, match="encoder='tiktoken' cannot encode with this tokenizer: .*WordPiece"):
        choose_encoder("tiktoken", tokenizer_json, np.uint16, ["some text"], problem)


def merge_order_tokenizer():
    """A byte-level BPE where tiktoken differs from HF: merges b+c, a+b, ab+c make "abc" a token that
    tiktoken takes whole while HF's merges stop at [a, bc]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastlm.tokenizer import _byte_alphabet

    vocab = {char: i for i, char in enumerate(_byte_alphabet().values())}
    vocab.update(bc=256, ab=257, abc=258)
    backend = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_auto_falls_back_with_a_warning_when_tiktoken_differs():
    tok = merge_order_tokenizer()
    tokenizer_json = tok.backend_tokenizer.to_str()
    assert byte_level_bpe_problem(tokenizer_json) is None
    assert tok("abc", add_special_tokens=False)["input_ids"] == [ord("a"), 256]
    with pytest.warns(UserWarning, match=r"tiktoken's ids differ from the tokenizer's on 'abc'.*Hugging Face"):
        encoder, why = choose_encoder("auto", tokenizer_json, np.uint16, ["abc"], None)
    assert isinstance(encoder, HFEncoder) and "abc" in why
    with pytest.raises(ValueError, match="differ"):
        choose_encoder("tiktoken", tokenizer_json, np.uint16, ["abc"], None)


def test_auto_falls_back_when_tiktoken_is_missing(gpt2_tok, monkeypatch):
    encoding_module._tiktoken_bpe.cache_clear()
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    tokenizer_json = gpt2_tok.backend_tokenizer.to_str()
    with pytest.warns(UserWarning, match="tiktoken is not available"):
        encoder, why = choose_encoder("auto", tokenizer_json, np.uint16, ["text"], None)
    assert isinstance(encoder, HFEncoder)
    with pytest.raises(ValueError, match="pip install"):
        choose_encoder("tiktoken", tokenizer_json, np.uint16, ["text"], None)
    encoding_module._tiktoken_bpe.cache_clear()


def test_hf_encoder_ignores_a_saved_truncation(gpt2_tok):
    spec = json.loads(gpt2_tok.backend_tokenizer.to_str())
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    tokens, lengths = HFEncoder(json.dumps(spec), np.uint16)(["one two three four five"])
    assert lengths.tolist() == [5]


def test_framing_skips_the_inner_ends_of_a_document_in_pieces(gpt2_tok):
    # A document in pieces: bos only before its first piece, eos only after its last.
    encoder = HFEncoder(gpt2_tok.backend_tokenizer.to_str(), np.uint16)
    batches = [Batch(["one doc\n", "start of a long"], open=True), Batch([" middle"], True, True), Batch([" end\n", "next\n"], True)]
    out = list(encode_batches(batches, encoder, prefix=[7], suffix=[8, 9]))
    ids = lambda text: gpt2_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [o[0].tolist() for o in out] == [
        [7, *ids("one doc\n"), 8, 9, 7, *ids("start of a long")],
        ids(" middle"),
        [*ids(" end\n"), 8, 9, 7, *ids("next\n"), 8, 9],
    ]
    assert [o[1].tolist() for o in out] == [[len(ids("one doc\n")) + 3, len(ids("start of a long")) + 1],
                                            [len(ids(" middle"))], [len(ids(" end\n")) + 2, len(ids("next\n")) + 3]]
    assert [o[3] for o in out] == [True, True, False]


def test_encode_batches_keeps_input_order(gpt2_tok, gpt2_tiktoken):
    encoder = gpt2_tiktoken
    batches = [Batch([f"batch {i} doc {j}\n" for j in range(i % 4 + 1)]) for i in range(20)] + [Batch([])]
    out = list(encode_batches(batches, encoder))
    got = [gpt2_tok.decode(tokens.tolist()) for tokens, *_ in out]
    assert got == ["".join(batch.texts) for batch in batches[:-1]]


def test_encoders_survive_a_pickle_round_trip(gpt2_tok, gpt2_tiktoken):
    # Worker processes started without fork receive the encoder pickled.
    import pickle

    hf = HFEncoder(gpt2_tok.backend_tokenizer.to_str(), np.uint16)
    texts = ["Hello world\n", "a <|endoftext|> b\n", "naïve café 😀\n"]
    for encoder in (hf, gpt2_tiktoken):
        encoder(texts)  # builds the Rust tokenizer, which must not travel in the pickle
        copy = pickle.loads(pickle.dumps(encoder))
        for got, want in zip(copy(texts), encoder(texts)):
            np.testing.assert_array_equal(got, want)
