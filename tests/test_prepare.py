"""fastlm.prepare: every input format round-trips to the tokenizer's own output; errors are clear and
never leave a store behind."""
import bz2
import csv
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.prepare import prepare
from fastlm.store import StoreError, StoreWriter, TokenStore, merge_stores
from fastlm.tokenizer_cache import tokenizer_info
from tests.data import fixture_path, wikitext_lines
from tests.reference import ref_file_documents, ref_line_documents, ref_paragraph_documents

prepare_module = sys.modules["fastlm.prepare"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lines():
    """Raw WikiText lines (each keeps its newline), blank ones included."""
    rows = wikitext_lines("valid")[:160]
    return [row if row else " \n" for row in rows]


@pytest.fixture(scope="module")
def docs(lines):
    return [line for line in lines if line.strip()]


def ids(tok, texts, **kwargs):
    return tok(list(texts), add_special_tokens=kwargs.pop("add_special_tokens", False), **kwargs)["input_ids"]


def store_docs(store):
    return [doc.tolist() for doc in store]


def no_leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.startswith(".")] == []


def write_text(path, text):
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def write_format(directory, fmt, docs):
    """The documents as one file (or dataset) of format ``fmt``; returns prepare() keyword arguments."""
    if fmt in ("txt", "txt.gz", "txt.xz", "txt.bz2"):
        return {"sources": [write_text(directory / f"corpus.{fmt}", "".join(docs))]}
    records = [{"id": i, "text": text} for i, text in enumerate(docs)]
    if fmt in ("jsonl", "jsonl.gz"):
        path = write_text(directory / f"corpus.{fmt}", "".join(json.dumps(r) + "\n" for r in records))
        return {"sources": [path]}
    if fmt == "json":
        return {"sources": [write_text(directory / "corpus.json", json.dumps(records))]}
    if fmt == "csv":
        path = directory / "corpus.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(records)
        return {"sources": [path]}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), directory / "corpus.parquet")
        return {"sources": [directory / "corpus.parquet"]}
    if fmt == "hf_saved":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(directory / "saved"))
        return {"sources": [], "dataset_name": str(directory / "saved")}
    if fmt == "hf_json_loader":
        path = write_text(directory / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return {"sources": [path], "dataset_name": "json", "split": "train"}
    raise AssertionError(fmt)


FORMATS = ["txt", "txt.gz", "txt.xz", "txt.bz2", "jsonl", "jsonl.gz", "json", "csv", "parquet", "hf_saved", "hf_json_loader"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(tmp_path, gpt2_tok, docs, fmt):
    kwargs = write_format(tmp_path, fmt, docs)
    store = prepare(kwargs.pop("sources"), tmp_path / "store", tokenizer=gpt2_tok, progress=False, **kwargs)
    assert store.tokens.dtype == np.uint16
    assert store_docs(store) == ids(gpt2_tok, docs)
    assert gpt2_tok.decode(store.tokens.tolist()) == "".join(docs)
    assert store.meta["n_docs"] == len(docs)
    assert no_leftovers(tmp_path)


def test_wikitext_raw_file_gives_the_tutorial_token_stream(tmp_path, gpt2_tok):
    # The tutorial tokenizes the HF rows one by one ("" for blank lines) and concatenates them.
    rows = wikitext_lines("valid")
    store = prepare([fixture_path("wikitext-2-raw", "wiki.valid.raw.xz")], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    expected = np.fromiter((t for row in ids(gpt2_tok, rows) for t in row), np.int64)
    np.testing.assert_array_equal(store.tokens, expected)
    # GPT-2 takes the tiktoken path by default; every document's text bytes are recorded.
    assert store.meta["encoding"]["encoder"] == "tiktoken" and store.meta["encoding"]["why_not_tiktoken"] is None
    assert store.doc_bytes.tolist() == [len(row.encode()) for row in rows if row]


@pytest.mark.parametrize("batch_bytes", [7, 1 << 20])
def test_paragraph_and_file_boundaries(tmp_path, gpt2_tok, monkeypatch, batch_bytes):
    # Tiny read batches cut paragraphs across chunk edges: the result must not change.
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", batch_bytes)
    text = "first line\nsecond line\n\n  \n\nthird para\r\nstill third\n\n\nlast, no newline"
    paragraphs = ["first line\nsecond line\n", "third para\r\nstill third\n", "last, no newline"]
    path = write_text(tmp_path / "c.txt", text)
    para = prepare([path], tmp_path / "p", tokenizer=gpt2_tok, doc_boundary="paragraph", progress=False)
    assert store_docs(para) == ids(gpt2_tok, paragraphs)
    whole = prepare([path, path], tmp_path / "f", tokenizer=gpt2_tok, doc_boundary="file", progress=False)
    assert store_docs(whole) == ids(gpt2_tok, [text, text])
    lines = prepare([path], tmp_path / "l", tokenizer=gpt2_tok, progress=False)
    expected = ["first line\n", "second line\n", "third para\r\n", "still third\n", "last, no newline"]
    assert store_docs(lines) == ids(gpt2_tok, expected)


def joined_pieces(batches):
    """The documents of a stream of Batches, the pieces of long ones joined back."""
    docs = []
    for batch in batches:
        texts = list(batch.texts)
        if batch.continues:
            docs[-1] += texts.pop(0)
        docs.extend(texts)
    return docs


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab \t\r\n\x0c\u2028\u00e9\u20ac\U0001f600", max_size=80),
    batch_bytes=st.integers(1, 40),
    boundary=st.sampled_from(["line", "paragraph", "file"]),
    keep_blank=st.booleans(),
    keep_linebreaks=st.booleans(),
)
def test_chunked_reader_splits_documents_like_the_reference(tmp_path_factory, text, batch_bytes, boundary, keep_blank,
                                                            keep_linebreaks):
    # Read batches cut anywhere after a newline, and inside lines longer than a batch (multi-byte
    # characters, "\r\n", blank runs): the documents must not depend on where the cuts fall, whether
    # long documents are joined back whole or cut where GPT-2's split cuts, nor on keeping blank lines
    # (the runner's default, as HF's text loader) or dropping line breaks.
    path = tmp_path_factory.mktemp("reader") / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    old = prepare_module._BATCH_BYTES
    prepare_module._BATCH_BYTES = batch_bytes

    def batches():
        return prepare_module._file_batches(path, boundary, "text", "strict", keep_blank, keep_linebreaks)

    try:
        whole = [doc for batch in prepare_module._whole_documents(batches(), keep_blank) for doc in batch.texts]
        pieces = list(prepare_module._safe_pieces(batches(), keep_blank))
    finally:
        prepare_module._BATCH_BYTES = old
    reference = {"line": lambda t: ref_line_documents(t, keep_blank, keep_linebreaks),
                 "paragraph": ref_paragraph_documents,  # blank lines end paragraphs: there is no blank one
                 "file": lambda t: ref_file_documents(t, keep_blank)}[boundary]
    assert whole == reference(text)
    assert joined_pieces(pieces) == reference(text)
    # Every piece that leaves its document open ends just before a space or newline that follows text.
    for batch, after in zip(pieces, pieces[1:]):
        if batch.open:
            assert not batch.texts[-1][-1].isspace() and after.texts[0][:1] in (" ", "\n")


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.sampled_from([b"a", b" ", b"\n", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xff",
                                    b"\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f"]), max_size=40),
    batch_bytes=st.integers(1, 12),
)
def test_cuts_inside_long_lines_decode_like_the_whole_file(tmp_path_factory, parts, batch_bytes):
    # Pieces of a line longer than a batch are cut between characters: with --errors replace, broken
    # and truncated sequences turn into the same U+FFFD as when the file is decoded whole.
    data = b"".join(parts)
    path = tmp_path_factory.mktemp("cuts") / "c.txt"
    path.write_bytes(data)
    old = prepare_module._BATCH_BYTES
    prepare_module._BATCH_BYTES = batch_bytes
    try:
        chunks = list(prepare_module._text_pieces(path, "replace"))
        whole_lines = list(prepare_module._text_chunks(path, "replace"))
    finally:
        prepare_module._BATCH_BYTES = old
    assert "".join(text for text, _, _ in chunks) == data.decode("utf-8", "replace")
    assert [line for _, line, _ in chunks] == [1 + "".join(t for t, _, _ in chunks[:i]).count("\n") for i in range(len(chunks))]
    # The readers of CSV and JSON lines get whole lines.
    assert "".join(whole_lines) == data.decode("utf-8", "replace")
    assert all(chunk.endswith("\n") for chunk in whole_lines[:-1])


def test_eos_and_bos_around_every_document(tmp_path, gpt2_tok, docs):
    path = write_text(tmp_path / "c.txt", "".join(docs[:20]))
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, append_eos=True, prepend_bos=True, progress=False)
    eos = bos = gpt2_tok.eos_token_id
    assert store_docs(store) == [[bos, *row, eos] for row in ids(gpt2_tok, docs[:20])]
    assert store.meta["special_ids"]["eos"] == eos and store.meta["args"]["append_eos"] is True


def test_wordpiece_vocab_file_with_its_own_template(tmp_path, bert_tok, docs):
    path = write_text(tmp_path / "c.txt", "".join(docs[:20]))
    vocab = fixture_path("tokenizers", "bert-base-uncased", "vocab.txt")
    store = prepare([path], tmp_path / "s", tokenizer=str(vocab), add_special_tokens=True, progress=False)
    assert store_docs(store) == ids(bert_tok, docs[:20], add_special_tokens=True)
    assert store.meta["special_ids"]["mask"] == 103 and store.meta["special_ids"]["cls"] == 101
    assert store.meta["encoding"]["encoder"] == "hf" and "WordPiece" in store.meta["encoding"]["why_not_tiktoken"]
    with pytest.raises(ValueError, match="needs a eos token"):
        prepare([path], tmp_path / "t", tokenizer=str(vocab), append_eos=True, progress=False)
    with pytest.raises(ValueError, match="encoder='tiktoken' cannot encode with this tokenizer: .*WordPiece"):
        prepare([path], tmp_path / "t", tokenizer=str(vocab), encoder="tiktoken", progress=False)
    assert not (tmp_path / "t").exists() and no_leftovers(tmp_path)


def test_bpe_vocab_and_merges_files(tmp_path, roberta_tok, docs):
    path = write_text(tmp_path / "c.txt", "".join(docs[:20]))
    vocab = fixture_path("tokenizers", "roberta", "vocab.json")
    store = prepare([path], tmp_path / "s", tokenizer=str(vocab), progress=False)
    assert store_docs(store) == ids(roberta_tok, docs[:20])
    # RoBERTa's vocabulary has gaps: ids run up to <mask> = 50264, past its 50262 entries.
    assert store.meta["vocab_size"] == 50265 and store.meta["special_ids"]["mask"] == 50264


def test_saved_tokenizer_loads_offline(tmp_path, gpt2_tok, docs):
    from transformers import AutoTokenizer

    path = write_text(tmp_path / "c.txt", "".join(docs[:10]))
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    reloaded = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    assert ids(reloaded, docs[:10]) == store_docs(store)


def test_more_than_65536_ids_gives_uint32(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"] = 70000
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    path = write_text(tmp_path / "c.txt", "w1 w69999 w65536\nw0 nope w65535\n")
    store = prepare([path], tmp_path / "s", tokenizer=tok, progress=False)
    assert store.tokens.dtype == np.uint32
    assert store_docs(store) == [[1, 69999, 65536], [0, 70000, 65535]]


def test_train_tokenizer_is_saved_beside_the_store(tmp_path, docs):
    from transformers import AutoTokenizer

    path = write_text(tmp_path / "c.txt", "".join(docs))
    store = prepare([path], tmp_path / "s", train_tokenizer=True, vocab_size=400, append_eos=True, progress=False)
    reloaded = AutoTokenizer.from_pretrained(str(store.tokenizer_dir))
    assert store.meta["vocab_size"] <= 400 and store.meta["args"]["train_tokenizer"] is True
    eos = reloaded.eos_token_id
    assert eos is not None and store.meta["special_ids"]["eos"] == eos
    assert store_docs(store) == [[*row, eos] for row in ids(reloaded, docs)]
    assert reloaded.decode(store.doc(3)[:-1].tolist()) == docs[3]


@pytest.fixture(scope="module")
def serial_store(tmp_path_factory, gpt2_tok, docs):
    """The reference for the parallel runs: num_proc=1, Hugging Face encoder, small batches."""
    root = tmp_path_factory.mktemp("serial")
    path = write_text(root / "c.txt", "".join(docs) + "naïve café 😀\n" * 3)
    old = prepare_module._BATCH_BYTES
    prepare_module._BATCH_BYTES = 2000
    try:
        return path, prepare([path], root / "s", tokenizer=gpt2_tok, append_eos=True, encoder="hf", progress=False)
    finally:
        prepare_module._BATCH_BYTES = old


@pytest.mark.parametrize("encoder, num_proc", [("tiktoken", 1), ("tiktoken", 2), ("tiktoken", 3), ("hf", 3)])
def test_stores_are_identical_whatever_the_encoder_and_num_proc(tmp_path, gpt2_tok, serial_store, monkeypatch, encoder, num_proc):
    # Small batches so every thread gets several and results must come back in order.
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", 2000)
    path, serial = serial_store
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, append_eos=True, encoder=encoder, num_proc=num_proc, progress=False)
    assert store.meta["checksums"] == serial.meta["checksums"]
    np.testing.assert_array_equal(store.tokens, serial.tokens)
    np.testing.assert_array_equal(store.offsets, serial.offsets)
    np.testing.assert_array_equal(store.doc_bytes, serial.doc_bytes)
    assert store.meta["encoding"]["encoder"] == encoder


def test_byte_counts_are_each_documents_utf8_length(tmp_path, gpt2_tok):
    text = "ascii line\nnaïve café\n\n😀 emoji 👍🏽\nbroken \xff\xfe bytes\n日本語\n"
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode("utf-8").replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, errors="replace", append_eos=True, progress=False)
    docs = ["ascii line\n", "naïve café\n", "😀 emoji 👍🏽\n", "broken \ufffd\ufffd bytes\n", "日本語\n"]
    assert store.doc_bytes.tolist() == [len(doc.encode()) for doc in docs]
    assert store.n_bytes == sum(len(doc.encode()) for doc in docs) == store.meta["n_bytes"]


def test_adversarial_text_takes_the_tiktoken_path_with_the_tokenizers_ids(tmp_path, gpt2_tok, roberta_tok):
    lines = [
        "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 and combining e\u0301 a\u0308\u0323\n",
        "CRLF line\r\n",
        "U+2028\u2028inside\u2029and U+0085\u0085 and NBSP\u00a0here\n",
        "runs" + " " * 500 + "of\t\t\t\twhitespace" + " \t" * 200 + "\n",
        "it's we'll 1234567 ½ 日本語 \ufffd <|endoftext|> <mask> </s>\n",
    ]
    path = tmp_path / "c.txt"
    path.write_bytes("".join(lines).encode("utf-8") + b"invalid \xc3\x28 and \xed\xa0\x80 bytes\n")
    expected_docs = lines + ["invalid \ufffd( and \ufffd\ufffd\ufffd bytes\n"]
    for name, tok in (("g", gpt2_tok), ("r", roberta_tok)):
        store = prepare([path], tmp_path / name, tokenizer=tok, errors="replace", encoder="tiktoken", progress=False)
        assert store_docs(store) == ids(tok, expected_docs)


def test_auto_says_once_why_it_falls_back_and_the_ids_stay_the_tokenizers(tmp_path, docs):
    from tests.test_encoding import merge_order_tokenizer

    tok = merge_order_tokenizer()
    path = write_text(tmp_path / "c.txt", "abc abc\n" + "".join(docs[:30]))
    with pytest.warns(UserWarning) as warned:
        store = prepare([path], tmp_path / "s", tokenizer=tok, progress=False)
    assert [str(w.message) for w in warned if "tiktoken" in str(w.message)] == [
        "fastlm prepare: tiktoken's ids differ from the tokenizer's on 'abc abc\\n'; "
        "encoding with the Hugging Face tokenizer instead (slower)"
    ]
    assert store_docs(store) == ids(tok, ["abc abc\n", *docs[:30]])
    assert store.meta["encoding"]["encoder"] == "hf" and "abc" in store.meta["encoding"]["why_not_tiktoken"]


def test_merge_equals_preparing_the_concatenated_input(tmp_path, gpt2_tok, docs):
    a = write_text(tmp_path / "a.txt", "".join(docs[:50]))
    b = write_text(tmp_path / "b.txt.gz", "".join(docs[50:]))
    shards = [prepare([p], tmp_path / f"shard_{p.name}", tokenizer=gpt2_tok, append_eos=True, progress=False) for p in (a, b)]
    merged = merge_stores(shards, tmp_path / "merged")
    whole = prepare([a, b], tmp_path / "whole", tokenizer=gpt2_tok, append_eos=True, progress=False)
    np.testing.assert_array_equal(merged.tokens, whole.tokens)
    np.testing.assert_array_equal(merged.offsets, whole.offsets)
    assert merged.meta["checksums"] == whole.meta["checksums"]
    assert merged.meta["source"] == whole.meta["source"]
    assert (merged.tokenizer_dir / "tokenizer.json").is_file()


# --- long documents: encoded in pieces with the whole document's ids, or refused ------------------------


@pytest.fixture
def small_pieces(monkeypatch):
    """Read batches of 1000 bytes and an unsplit-document limit of 5000 characters, and the length of
    the longest text any encoder was given."""
    from fastlm.encoding import HFEncoder, TiktokenEncoder

    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", 1000)
    monkeypatch.setattr(prepare_module, "_MAX_UNSPLIT_CHARS", 5000)
    longest = [0]
    for cls in (HFEncoder, TiktokenEncoder):
        def spy(self, texts, real=cls.__call__):
            longest[0] = max([longest[0], *map(len, texts)])
            return real(self, texts)

        monkeypatch.setattr(cls, "__call__", spy)
    return longest


@pytest.fixture(scope="module")
def long_line(docs):
    """~25,000 characters of WikiText on one line: spaces, punctuation, numbers, some double spaces."""
    return "".join(doc.replace("\n", "  ") for doc in docs[:60]).strip() + " end\n"


@pytest.mark.parametrize("encoder", ["tiktoken", "hf"])
@pytest.mark.parametrize("boundary", ["line", "file"])
def test_a_long_line_is_encoded_in_pieces_with_the_whole_lines_ids(tmp_path, gpt2_tok, small_pieces, long_line, encoder, boundary):
    # A 200 MB line peaked at 22.9 GB: the tokenizer saw it whole. Now no call sees more than a few
    # read batches, and the ids are those of the whole line.
    assert len(long_line) > 20_000
    text = "short first line\n" + long_line + "\n   \n" + long_line.replace(" end", " the end")
    path = write_text(tmp_path / "c.txt", text)
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, doc_boundary=boundary, encoder=encoder,
                    append_eos=True, prepend_bos=True, progress=False)
    eos = gpt2_tok.eos_token_id
    whole = ids(gpt2_tok, {"line": ["short first line\n", long_line, long_line.replace(" end", " the end")],
                            "file": [text]}[boundary])
    assert store_docs(store) == [[eos, *doc, eos] for doc in whole]
    assert store.doc_bytes.tolist() == [len(doc.encode()) for doc in {"line": ["short first line\n", long_line, long_line.replace(" end", " the end")], "file": [text]}[boundary]]
    assert 0 < small_pieces[0] <= 2000


def test_a_long_row_is_encoded_in_pieces(tmp_path, gpt2_tok, small_pieces, long_line):
    # (parquet: pyarrow's JSON and CSV readers need a row to fit in a couple of read blocks)
    kwargs = write_format(tmp_path, "parquet", ["first row", long_line * 2, "last row"])
    store = prepare(kwargs["sources"], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert store_docs(store) == ids(gpt2_tok, ["first row", long_line * 2, "last row"])
    assert 0 < small_pieces[0] <= 2000


@pytest.mark.parametrize("encoder", ["tiktoken", "hf"])
def test_a_long_blank_line_is_skipped_like_any_blank_line_unless_blank_ones_are_kept(tmp_path, gpt2_tok, small_pieces,
                                                                                      encoder):
    path = write_text(tmp_path / "c.txt", "one\n \n" + " \t" * 1500 + "\ntwo\n")
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, encoder=encoder, progress=False)
    assert store_docs(store) == ids(gpt2_tok, ["one\n", "two\n"])
    # The runner's default (HF's text loader keeps such rows), here without the line breaks.
    kept = prepare([path], tmp_path / "k", tokenizer=gpt2_tok, encoder=encoder, keep_blank=True, keep_linebreaks=False,
                   progress=False)
    assert store_docs(kept) == ids(gpt2_tok, ["one", " ", " \t" * 1500, "two"])
    assert kept.meta["args"]["keep_blank"] and not kept.meta["args"]["keep_linebreaks"]
    rows = write_format(tmp_path, "parquet", ["a", "", " ", "b"])
    kept = prepare(rows["sources"], tmp_path / "r", tokenizer=gpt2_tok, encoder=encoder, keep_blank=True, progress=False)
    assert store_docs(kept) == ids(gpt2_tok, ["a", "", " ", "b"])


def test_a_long_line_is_refused_naming_file_and_line_when_it_cannot_be_cut(tmp_path, gpt2_tok, bert_tok, small_pieces, long_line):
    # WordPiece (BERT) cannot be cut safely: a line over the limit is refused, not read whole.
    path = write_text(tmp_path / "c.txt", "first\n" + long_line + "last\n")
    vocab = str(fixture_path("tokenizers", "bert-base-uncased", "vocab.txt"))
    with pytest.raises(ValueError, match=r"c.txt, line 2: a document of more than 5,000 characters"):
        prepare([path], tmp_path / "s", tokenizer=vocab, progress=False)
    # Nor can a byte-level BPE cut a run with no space after text in it.
    path = write_text(tmp_path / "d.txt", "first\nsecond\n" + "x" * 9000 + " tail\n")
    with pytest.raises(ValueError, match=r"d.txt, line 3: more than 5,000 characters without a space or newline"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    kwargs = write_format(tmp_path, "parquet", ["first row", "second", long_line])
    with pytest.raises(ValueError, match=r"corpus.parquet, row 2: a document of more than 5,000 characters"):
        prepare(kwargs["sources"], tmp_path / "s", tokenizer=vocab, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)
    # Under the limit, BERT gets the long line whole.
    path = write_text(tmp_path / "e.txt", "first\n" + long_line[:4000] + "\n")
    store = prepare([path], tmp_path / "s", tokenizer=vocab, progress=False)
    assert store_docs(store) == ids(bert_tok, ["first\n", long_line[:4000] + "\n"])


# --- bad input: clear errors, no store ------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_empty_input_is_an_error_and_writes_nothing(tmp_path, gpt2_tok, content):
    path = write_text(tmp_path / "empty.txt", content)
    with pytest.raises(ValueError, match="no documents found in .*empty.txt"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("batch_bytes", [5, 1 << 20])
def test_invalid_utf8_names_file_and_line(tmp_path, gpt2_tok, monkeypatch, batch_bytes):
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", batch_bytes)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbroken \xff byte\nafter\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: invalid UTF-8"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, errors="replace", progress=False)
    assert gpt2_tok.decode(store.doc(2).tolist()) == "broken \ufffd byte\n"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf_saved", "json"])
def test_missing_text_column_lists_the_columns_there_are(tmp_path, gpt2_tok, docs, fmt):
    kwargs = write_format(tmp_path, fmt, docs[:5])
    columns = "'text'" if fmt == "hf_saved" else "'id', 'text'"
    with pytest.raises(ValueError, match=rf"no text column 'body' \(columns: {columns}\); use --text-column"):
        prepare(kwargs.pop("sources"), tmp_path / "s", tokenizer=gpt2_tok, text_column="body", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_later_row_without_the_text_field_is_named(tmp_path, gpt2_tok, fmt):
    rows = [{"text": "a\n"}, {"text": "b\n"}, {"body": "c", "id": 2}, {"text": "d\n"}]
    path = tmp_path / f"c.{fmt}"
    path.write_text("\n".join(map(json.dumps, rows)) if fmt == "jsonl" else json.dumps(rows))
    with pytest.raises(ValueError, match=rf"c.{fmt}, row 2: no text column 'text' \(columns: 'body', 'id'\)"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)


# Each writes a corrupt file of the given name into a directory; the error must name the file.
def _truncated(suffix):
    def write(path):
        opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}[suffix]
        with opener(path, "wb") as f:
            f.write(b"one document\n" * 5000)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return write


def _bad_gzip_crc(path):
    data = bytearray(gzip.compress(b"one document\n" * 50))
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, write, message", [
    ("c.txt.gz", _truncated(".gz"), "c.txt.gz: corrupt or truncated .gz data (Compressed file ended"),
    ("c.txt.xz", _truncated(".xz"), "c.txt.xz: corrupt or truncated .xz data"),
    ("c.txt.bz2", _truncated(".bz2"), "c.txt.bz2: corrupt or truncated .bz2 data"),
    ("c.jsonl.gz", _truncated(".gz"), "c.jsonl.gz: corrupt or truncated .gz data"),
    ("c.txt.gz", _bad_gzip_crc, "c.txt.gz: corrupt or truncated .gz data (CRC check failed"),
    ("c.txt.gz", lambda path: path.write_text("plain text, not gzip\n"), "c.txt.gz: corrupt or truncated .gz data (Not a gzipped file"),
    ("c.json.xz", lambda path: path.write_text("[]" * 100), "c.json.xz: corrupt or truncated .xz data (Input format not supported"),
    ("c.parquet", lambda path: path.write_text("id,text\n1,hello\n"), "c.parquet: not a readable Parquet file (Parquet magic bytes"),
])
def test_corrupt_input_names_the_file(tmp_path, gpt2_tok, name, write, message):
    write(tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare([tmp_path / name], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


INVALID_UTF8 = {
    "jsonl": b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken \xff byte"}\n',
    "csv": b'id,text\n0,fine\n1,"two\nlines"\n2,broken \xff byte\n',
    "json": b'[{"text": "fine"},\n{"text": "broken \xff byte"}]',
}


@pytest.mark.parametrize("fmt, line", [("jsonl", 3), ("csv", 5), ("json", 2)])
def test_invalid_utf8_in_structured_files_names_file_and_line_or_is_replaced(tmp_path, gpt2_tok, fmt, line):
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(INVALID_UTF8[fmt])
    with pytest.raises(ValueError, match=rf"bad.{fmt}, line {line}: invalid UTF-8 .*--errors replace"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, errors="replace", progress=False)
    assert gpt2_tok.decode(store.doc(-1).tolist()) == "broken \ufffd byte"


def test_csv_quote_that_is_never_closed_is_an_error(tmp_path, gpt2_tok):
    # A parser that does not check would read rows 2-3 as part of row 1's text.
    path = tmp_path / "c.csv"
    path.write_text('id,text\n0,fine\n1,"open quote\n2,swallowed\n3,also swallowed\n')
    with pytest.raises(ValueError, match=r"c.csv, line 3: a quote opened in this row is never closed"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    path.write_text("id,text\n0,fine\n1,short\n2\n")
    with pytest.raises(ValueError, match=r"c.csv, line 4: 1 fields, but the header has 2"):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)


def test_csv_values_spanning_lines_across_read_batches(tmp_path, gpt2_tok, monkeypatch):
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", 64)
    texts = [f"row {i}, first line\nsecond line with \"quotes\"\n\nlast" for i in range(40)]
    path = tmp_path / "c.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], *[[i, text] for i, text in enumerate(texts)]])
    store = prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert store_docs(store) == ids(gpt2_tok, texts)


def test_dataset_with_several_splits_needs_one(tmp_path, gpt2_tok, docs):
    import datasets

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": docs[:5]}), validation=datasets.Dataset.from_dict({"text": docs[5:9]})
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\]"):
        prepare([], tmp_path / "s", tokenizer=gpt2_tok, dataset_name=str(tmp_path / "dd"), progress=False)
    store = prepare([], tmp_path / "s", tokenizer=gpt2_tok, dataset_name=str(tmp_path / "dd"), split="validation", progress=False)
    assert store_docs(store) == ids(gpt2_tok, docs[5:9])
    assert store.meta["source"]["split"] == "validation"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "no tokenizer"),
        ({"tokenizer": "x", "train_tokenizer": True, "vocab_size": 300}, "not both"),
        ({"train_tokenizer": True}, "needs vocab_size"),
        ({"tokenizer": "x", "vocab_size": 300}, "only applies"),
        ({"tokenizer": "x", "doc_boundary": "sentence"}, "doc_boundary"),
        ({"tokenizer": "x", "errors": "ignore"}, "errors"),
        ({"tokenizer": "x", "num_proc": 0}, "num_proc"),
        # Training reserves memory for the requested size up front: 1e9 aborts the process (SIGABRT).
        ({"train_tokenizer": True, "vocab_size": 4194305}, r"vocab-size must be an integer in \[257, 4194304\]"),
        ({"train_tokenizer": True, "vocab_size": 256}, r"vocab-size must be an integer in \[257, 4194304\]"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    path = write_text(tmp_path / "c.txt", "hello\n")
    with pytest.raises(ValueError, match=message):
        prepare([path], tmp_path / "s", progress=False, **kwargs)


def test_missing_source_and_existing_output(tmp_path, gpt2_tok):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare([tmp_path / "nope.txt"], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    with pytest.raises(ValueError, match="no input"):
        prepare([], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    path = write_text(tmp_path / "c.txt", "hello\n")
    prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    with pytest.raises(FileExistsError):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert store_docs(prepare([path], tmp_path / "s", tokenizer=gpt2_tok, overwrite=True, append_eos=True, progress=False)) == [
        ids(gpt2_tok, ["hello\n"])[0] + [gpt2_tok.eos_token_id]
    ]


def test_overwrite_is_refused_before_the_tokenizer_is_loaded(tmp_path):
    path = write_text(tmp_path / "c.txt", "hello\n")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "meta.json").write_text("{}")
    (tmp_path / "proj" / "thesis.tex").write_text("precious")
    # An unloadable tokenizer would raise OSError: the destination is checked first.
    with pytest.raises(FileExistsError, match="it holds thesis.tex"):
        prepare([path], tmp_path / "proj", tokenizer="no-such-org/no-such-tokenizer", overwrite=True, progress=False)
    assert (tmp_path / "proj" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("content, detail", [
    ("{1: 2}", "Exception: key must be a string"),
    ('{"version": "1.0", "trunc', "Exception: EOF while parsing"),
    ("[]", "Exception: invalid type: sequence"),
])
def test_broken_tokenizer_json_names_the_file(tmp_path, gpt2_tok, content, detail):
    path = write_text(tmp_path / "c.txt", "hello\n")
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"tokenizer.json: not a readable tokenizer ({detail}")):
        prepare([path], tmp_path / "s", tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
    gpt2_tok.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape("saved: not a readable tokenizer (")):
        prepare([path], tmp_path / "s", tokenizer=str(tmp_path / "saved"), progress=False)
    assert not (tmp_path / "s").exists()


def test_a_store_loads_its_own_tokenizer_or_says_why_not(tmp_path, gpt2_tok, bert_tok):
    store = prepare([write_text(tmp_path / "c.txt", "hello\n")], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert store.load_tokenizer().get_vocab() == gpt2_tok.get_vocab()
    (store.tokenizer_dir / "tokenizer.json").write_text("{1: 2}")
    with pytest.raises(ValueError, match="tokenizer: not a readable tokenizer"):
        store.load_tokenizer()
    shutil.rmtree(store.tokenizer_dir)
    bert_tok.save_pretrained(store.tokenizer_dir)
    with pytest.raises(StoreError, match="is not the tokenizer .* was made with"):
        store.load_tokenizer()
    shutil.rmtree(store.tokenizer_dir)
    with pytest.raises(StoreError, match="has no tokenizer"):
        store.load_tokenizer()


def test_unknown_tokenizer_name_offline(tmp_path):
    path = write_text(tmp_path / "c.txt", "hello\n")
    with pytest.raises(OSError, match="could not load tokenizer 'no-such-org/no-such-tokenizer'"):
        prepare([path], tmp_path / "s", tokenizer="no-such-org/no-such-tokenizer", progress=False)
    assert not (tmp_path / "s").exists()


def test_an_exception_midway_leaves_nothing(tmp_path, gpt2_tok, docs, monkeypatch):
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", 500)
    path = write_text(tmp_path / "c.txt", "".join(docs))
    real = StoreWriter.append
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "append", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


KILL_MIDWAY = """
import os, signal, sys
from fastlm.store import StoreWriter
import fastlm.prepare
prepare_module = sys.modules["fastlm.prepare"]
prepare_module._BATCH_BYTES = 500
real_append = StoreWriter.append
def append_then_die(self, *args, **kwargs):
    real_append(self, *args, **kwargs)
    if self.n_docs > 20:
        os.kill(os.getpid(), signal.SIGKILL)
StoreWriter.append = append_then_die
prepare_module.prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], progress=False)
"""


def test_a_killed_prepare_leaves_no_valid_store(tmp_path, docs):
    path = write_text(tmp_path / "c.txt", "".join(docs))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gpt2 = fixture_path("tokenizers", "gpt2")
    result = subprocess.run(
        [sys.executable, "-c", KILL_MIDWAY, str(path), str(tmp_path / "s"), str(gpt2)], env=env, capture_output=True
    )
    assert result.returncode == -9, result.stderr.decode()
    assert not (tmp_path / "s").exists()
    with pytest.raises(StoreError):
        TokenStore.open(tmp_path / "s")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "tokens.bin").is_file()
    with pytest.raises(StoreError, match="meta.json is missing"):
        TokenStore.open(leftovers[0])
    # The next prepare into the same destination removes what the killed one left.
    store = prepare([path], tmp_path / "s", tokenizer=str(gpt2), progress=False)
    assert len(store) == len(docs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.")] == []


# --- a full disk or a file-size limit (ulimit -f) while the store is written -------------------------------

UNDER_A_LIMIT = """
import sys
import fastlm.prepare
from fastlm import cli
sys.modules["fastlm.prepare"]._BATCH_BYTES = int(sys.argv[1])  # small slices: the workers get several
sys.exit(cli.main(sys.argv[2:]))
"""


def file_size_limit(limit):
    """A subprocess's preexec_fn: its files may not grow past ``limit`` bytes (RLIMIT_FSIZE, as `ulimit -f`
    sets); SIGXFSZ ignored, as CPython does at start-up, so the write fails with EFBIG."""
    import resource
    import signal

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return limit_files


def prepare_under_a_limit(limit, *args, batch_bytes=1 << 20):
    """`fastlm prepare ARGS` in a process whose files may not grow past ``limit`` bytes."""
    return subprocess.run([sys.executable, "-c", UNDER_A_LIMIT, str(batch_bytes), "prepare", *map(str, args), "--no-progress"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=file_size_limit(limit), timeout=300)


def assert_cannot_write(result, path_pattern):
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(rf"fastlm prepare: error: cannot write {path_pattern}: File too large \(errno 27\); nothing "
                        r"was written \(free space there, or raise the file-size limit: ulimit -f\)\n", result.stderr)


def tree_checksums(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_vocab_store(tmp_path_factory, docs):
    """A store whose tokenizer (a 300-id BPE) is a few kB and whose tokens.bin is many times larger."""
    root = tmp_path_factory.mktemp("small_vocab")
    path = write_text(root / "c.txt", "".join(docs) * 4)
    store = prepare([path], root / "s", train_tokenizer=True, vocab_size=300, progress=False)
    tokenizer_json = (store.tokenizer_dir / "tokenizer.json").stat().st_size
    assert 4 * tokenizer_json < store.tokens.nbytes
    tokenizer_info(store.tokenizer_dir)  # cached here: the processes under a limit need not import transformers
    return path, store, 2 * tokenizer_json


@pytest.mark.parametrize("tokenizer", [["--tokenizer", fixture_path("tokenizers", "gpt2")],
                                       ["--train-tokenizer", "--vocab-size", "300"]], ids=["gpt2", "trained"])
def test_a_tokenizer_too_large_for_the_file_size_limit_is_one_line_and_no_store(tmp_path, docs, tokenizer):
    path = write_text(tmp_path / "c.txt", "".join(docs))
    if tokenizer[0] == "--tokenizer":
        tokenizer_info(tokenizer[1])  # cached: the store's copy is then a shutil.copytree from the cache
    # Was a traceback ending in tokenizers' `Exception: File too large (os error 27)`.
    result = prepare_under_a_limit(2000, path, "-o", tmp_path / "s", *tokenizer)
    assert_cannot_write(result, re.escape(str(tmp_path / "s" / "tokenizer")) + r"/[\w.]+")
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


def test_tokens_too_large_for_the_file_size_limit_name_tokens_bin(tmp_path, small_vocab_store):
    path, store, limit = small_vocab_store
    result = prepare_under_a_limit(limit, path, "-o", tmp_path / "s", "--tokenizer", store.tokenizer_dir)
    assert_cannot_write(result, re.escape(str(tmp_path / "s" / "tokens.bin")))
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


def test_a_failed_overwrite_leaves_the_previous_store_as_it_was(tmp_path, small_vocab_store):
    path, store, limit = small_vocab_store
    shutil.copytree(store.path, tmp_path / "s")
    before = tree_checksums(tmp_path / "s")
    result = prepare_under_a_limit(limit, path, "-o", tmp_path / "s", "--tokenizer", store.tokenizer_dir,
                                   "--append-eos", "--overwrite")
    assert_cannot_write(result, re.escape(str(tmp_path / "s" / "tokens.bin")))
    assert tree_checksums(tmp_path / "s") == before and no_leftovers(tmp_path)
    TokenStore.open(tmp_path / "s", verify=True)


def test_a_failed_write_in_a_worker_process_is_the_same_one_line(tmp_path, small_vocab_store):
    path, store, limit = small_vocab_store
    result = prepare_under_a_limit(limit, path, "-o", tmp_path / "s", "--tokenizer", store.tokenizer_dir,
                                   "--num-proc", "2", batch_bytes=2000)
    # A worker's part (in the store's temporary directory) or the store's own tokens.bin, whichever fills first.
    assert_cannot_write(result, re.escape(str(tmp_path / "s")) + r"/(parts/\d+/)?tokens\.bin")
    assert not (tmp_path / "s").exists() and no_leftovers(tmp_path)


def test_cpu_seconds_resolve_work_shorter_than_a_clock_tick():
    # os.times counts 10 ms ticks, so a small corpus's encoding read 0 CPU seconds and its rate was lost.
    import time

    from fastlm.prepare import cpu_seconds

    start, wall = cpu_seconds(), time.perf_counter()
    while time.perf_counter() - wall < 0.002:
        pass
    assert cpu_seconds() - start > 0
