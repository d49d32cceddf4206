"""Megatron-LM indexed datasets against megatron-core's own reader and writer: opened in place as stores,
exported back; nanoGPT token files; and `fastlm prepare` of JSON lines equal to Megatron's preprocess_data."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastlm.export as export_module
from fastlm import pack_blocks, pack_documents
from fastlm.cli import main
from fastlm.export import export_store
from fastlm.megatron import MegatronStore
from fastlm.prepare import prepare
from fastlm.store import StoreError, StoreWriter, TokenStore
from tests.data import fixture_path, wikitext_lines
from tests.reference import ref_nanogpt_tokens

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
IndexedDataset, IndexedDatasetBuilder = indexed_dataset.IndexedDataset, indexed_dataset.IndexedDatasetBuilder
INTEGER_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16]
GPT2_EOD = 50256


def build(prefix, documents, dtype=np.uint16):
    """A dataset written by megatron-core's IndexedDatasetBuilder; a document is a list of sequences."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        builder.add_document(np.array([t for s in sequences for t in s], dtype), [len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def megatron_documents(prefix):
    """Documents as megatron-core reads them: the concatenated sequences of each document_indices range."""
    dataset = IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    return [[int(t) for i in range(bounds[d], bounds[d + 1]) for t in dataset[i]] for d in range(len(bounds) - 1)]


def store_documents(store):
    return [doc.tolist() for doc in store]


def random_documents(seed, n_docs=40, high=120, max_sequences=3):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, high, rng.integers(0, 9)).tolist() for _ in range(rng.integers(0, max_sequences + 1))]
            for _ in range(n_docs)]


def write_store(path, docs, vocab_size=50257, eos=None):
    with StoreWriter(path, vocab_size=vocab_size) as writer:
        writer.append(np.array([t for d in docs for t in d], np.int64), np.array([len(d) for d in docs], np.int64))
        return writer.close({"special_ids": {"eos": eos}})


# --- opening megatron-core's files in place -------------------------------------------------------------

@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: np.dtype(d).name)
def test_builder_datasets_open_with_megatrons_documents_without_a_copy(tmp_path, dtype):
    docs = random_documents(seed=np.dtype(dtype).itemsize)
    prefix = build(tmp_path / "corpus_text_document", docs, dtype)
    store = TokenStore.open(prefix)
    assert isinstance(store, MegatronStore)
    assert store_documents(store) == megatron_documents(prefix) == [[t for s in d for t in s] for d in docs]
    assert store.tokens.dtype == np.dtype(dtype)
    assert isinstance(store.tokens, np.memmap) and os.path.samefile(store.tokens.filename, f"{prefix}.bin")
    assert not store.tokens.flags.writeable and not store.offsets.flags.writeable
    assert store.offsets.dtype == np.int64 and store.offsets[0] == 0 and store.offsets[-1] == store.n_tokens
    assert store.meta["n_docs"] == len(store) == len(docs) and store.meta["n_tokens"] == store.n_tokens


def test_a_sentence_split_dataset_has_megatrons_documents_not_its_sequences(tmp_path):
    docs = [[[1, 2], [3, 4, 5], [6]], [[7]], [], [[8, 9], [10]]]
    prefix = build(tmp_path / "split_text_sentence", docs, np.int32)
    store = TokenStore.open(prefix)
    assert store_documents(store) == megatron_documents(prefix) == [[1, 2, 3, 4, 5, 6], [7], [], [8, 9, 10]]
    assert store.offsets.tolist() == [0, 6, 7, 7, 10]
    assert store.meta["n_sequences"] == 6 and len(IndexedDataset(prefix)) == 6
    # add_item + end_document, the builder's other way to write a document of several sequences
    builder = IndexedDatasetBuilder(str(tmp_path / "items.bin"), dtype=np.int32)
    import torch

    for sequence in ([4, 5], [6]):
        builder.add_item(torch.tensor(sequence))
    builder.end_document()
    builder.finalize(str(tmp_path / "items.idx"))
    assert store_documents(TokenStore.open(tmp_path / "items")) == [[4, 5, 6]]


def test_the_prefix_and_either_file_open_the_same_dataset(tmp_path):
    prefix = build(tmp_path / "wiki.v2_text_document", [[[1, 2]], [[3]]])
    for given in (prefix, f"{prefix}.bin", f"{prefix}.idx", tmp_path / "wiki.v2_text_document.idx"):
        store = TokenStore.open(given)
        assert store_documents(store) == [[1, 2], [3]] and str(store.path) == prefix


def test_an_empty_dataset_opens(tmp_path):
    store = TokenStore.open(build(tmp_path / "empty", []))
    assert len(store) == 0 and store.n_tokens == 0 and store.max_token_id is None


def test_what_a_megatron_dataset_does_not_record(tmp_path):
    store = TokenStore.open(build(tmp_path / "d", [[[5, 4464]], [[3]]]))
    for call in (store.load_tokenizer, lambda: store.tokenizer_dir):
        with pytest.raises(StoreError, match=r"records no tokenizer.*--tokenizer_name"):
            call()
    assert store.vocab_size is None and store.doc_bytes is None and store.n_bytes is None
    assert store.special_ids == dict.fromkeys(("eos", "bos", "pad", "mask", "cls", "sep", "unk"))
    assert store.pad_id == 0
    assert store.max_token_id == 4464 and store.token_id_range() == (3, 4464)
    # Slices stay Megatron stores, over the same memmap
    part = store[1:]
    assert isinstance(part, MegatronStore) and store_documents(part) == [[3]]
    assert np.shares_memory(part.tokens, store.tokens)
    # The content identity (what a checkpoint compares) follows the index, whatever the dataset is called
    os.rename(f"{store.path}.bin", tmp_path / "renamed.bin")
    os.rename(f"{store.path}.idx", tmp_path / "renamed.idx")
    assert store.meta["checksums"] == TokenStore.open(tmp_path / "renamed.bin").meta["checksums"]
    other = TokenStore.open(build(tmp_path / "e", [[[5, 4464]], [[3, 1]]]))
    assert other.meta["checksums"] != store.meta["checksums"]


def test_negative_ids_are_refused_when_the_ids_are_scanned(tmp_path):
    store = TokenStore.open(build(tmp_path / "d", [[[5, -2]]], np.int16))
    with pytest.raises(StoreError, match=r"negative token id \(-2\)"):
        store.max_token_id
    with pytest.raises(StoreError, match="negative token id"):
        TokenStore.open(store.path, verify=True)


def test_over_2_to_the_32_tokens_open_without_reading_the_bin(tmp_path):
    # A sparse .bin of 5 * 2**30 uint16 tokens (10 GiB, none stored): opening reads only the index, and
    # offsets past 2**32 come out right.
    prefix = tmp_path / "big"
    lengths = [2**30] * 5
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, len(lengths), 3))
        f.write(np.array(lengths, "<i4").tobytes())
        f.write((np.cumsum([0] + lengths[:-1]) * 2).astype("<i8").tobytes())
        f.write(np.array([0, 2, 5], "<i8").tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(sum(lengths) * 2)
    store = TokenStore.open(prefix)
    assert store.offsets.tolist() == [0, 2**31, 5 * 2**30] and store.n_tokens == 5 * 2**30
    assert store.doc(1)[-3:].tolist() == [0, 0, 0]


def test_packing_a_megatron_dataset_equals_packing_the_same_fastlm_store(tmp_path):
    docs = random_documents(seed=3, n_docs=60)
    megatron = TokenStore.open(build(tmp_path / "m", docs, np.int32))
    fastlm_store = write_store(tmp_path / "f", [[t for s in d for t in s] for d in docs], vocab_size=120)
    for pack in (lambda s: pack_blocks(s.tokens, s.offsets, 16, remainder="pad", pad_id=0),
                 lambda s: pack_documents(s.tokens, s.offsets, 16, pad_id=0)):
        a, b = pack(megatron), pack(fastlm_store)
        everything = np.arange(len(a))
        assert len(a) == len(b) > 0
        assert np.array_equal(a.gather(everything)["input_ids"], b.gather(everything)["input_ids"])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16], ids=lambda d: np.dtype(d).name)
def test_ids_in_a_dtype_the_kernels_do_not_read_are_refused_naming_it_never_copied(tmp_path, dtype, capsys):
    """megatron-core writes uint8/int8/int16 datasets; the packing kernels have no version for them, and
    converting a memmap would copy the whole dataset into memory: a TypeError names the dtypes there are."""
    prefix = build(tmp_path / "d", [[[1, 2], [3]], [[4, 5, 6]]], dtype)
    store = TokenStore.open(prefix)
    assert store.tokens.dtype == dtype and isinstance(store.tokens, np.memmap)
    name = np.dtype(dtype).name
    for pack in (pack_blocks, pack_documents):
        with pytest.raises(TypeError, match=rf"^tokens dtype {name} is not supported; use one of uint16, uint32, "
                                            r"int32, int64 \(tokens\.astype\(numpy\.uint16\) converts"):
            pack(store.tokens, store.offsets, 4, pad_id=0)
    packed = pack_blocks(store.tokens.astype(np.uint16), store.offsets, 2)
    assert packed.gather(np.arange(len(packed)))["input_ids"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert main(["pack", prefix, "--block-size", "4"]) == 2
    assert capsys.readouterr().err.startswith(f"fastlm pack: error: tokens dtype {name} is not supported;")


def test_merging_a_megatron_dataset_is_refused_saying_what_to_do(tmp_path, capsys):
    prefix = build(tmp_path / "m", [[[1, 2]]])
    store = write_store(tmp_path / "f", [[1, 2]], vocab_size=120)
    # Was "vocab_size must be a positive integer, got None".
    assert main(["merge", str(store.path), prefix, "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"fastlm merge: error: cannot merge {prefix}: it is a Megatron-LM indexed dataset, and merging joins fastlm "
        "token stores (which record their tokenizer); merge the fastlm stores it was exported from and export the "
        "result (fastlm export --format megatron), or join Megatron datasets with Megatron-LM's "
        "tools/merge_datasets.py\n")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.bin", "m.idx"]


# --- what is refused: one line, nothing opened -----------------------------------------------------------

def _rewrite_index(prefix, change):
    path = f"{prefix}.idx"
    data = bytearray(open(path, "rb").read())
    change(data)
    open(path, "wb").write(bytes(data))


S = 3  # the error rows' dataset: 3 sequences in 2 documents
HEADER = 34
CORRUPTIONS = {
    "bad magic": (lambda d: d.__setitem__(slice(0, 4), b"XXXX"), r"not a Megatron-LM index"),
    "version 2": (lambda d: d.__setitem__(slice(9, 17), struct.pack("<Q", 2)), r"index version 2"),
    "unknown dtype code": (lambda d: d.__setitem__(17, 9), r"dtype code 9, which megatron-core does not define"),
    "float32 code": (lambda d: d.__setitem__(17, 7), r"float32 values \(dtype code 7\): token ids are integers"),
    "truncated index": (lambda d: d.__delitem__(slice(-5, None)),
                        r"has 89 bytes but its header announces 3 sequences and 3 document indices \(94 bytes\)"),
    "trailing bytes": (lambda d: d.extend(b"\0\0"), r"has 96 bytes but its header announces"),
    "sequence modes": (lambda d: d.extend(b"\0" * S), r"holds sequence modes \(a multimodal dataset\)"),
    "negative length": (lambda d: d.__setitem__(slice(HEADER, HEADER + 4), struct.pack("<i", -1)),
                        r"sequence 0 has a negative length"),
    "pointer off": (lambda d: d.__setitem__(slice(HEADER + 4 * S + 8, HEADER + 4 * S + 16), struct.pack("<q", 6)),
                    r"sequence 1 starts at byte 6 of the .bin, but the lengths before it add up to byte 4"),
    "documents past the sequences": (lambda d: d.__setitem__(slice(-8, None), struct.pack("<q", 4)),
                                     r"document indices run from 0 to 4, expected 0 to the sequence count 3"),
}


@pytest.fixture
def good(tmp_path):
    return build(tmp_path / "good", [[[1, 2], [3]], [[4, 5, 6]]], np.uint16)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_index_is_one_clear_line(good, name, capsys):
    change, message = CORRUPTIONS[name]
    _rewrite_index(good, change)
    with pytest.raises(StoreError, match=message):
        TokenStore.open(good)
    assert main(["inspect", good]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastlm inspect: error: ")


def test_decreasing_document_indices_are_refused(tmp_path):
    prefix = build(tmp_path / "d", [[[1]], [[2]], [[3]]])  # document_indices [0, 1, 2, 3]
    _rewrite_index(prefix, lambda d: d.__setitem__(slice(-24, -16), struct.pack("<q", 2)) or
                   d.__setitem__(slice(-16, -8), struct.pack("<q", 1)))
    with pytest.raises(StoreError, match="document indices decrease at document 1"):
        TokenStore.open(prefix)


@pytest.mark.parametrize("size, problem", [(10, "truncated"), (14, "longer than its index says")])
def test_a_bin_of_the_wrong_size_is_refused(good, size, problem):
    with open(f"{good}.bin", "r+b") as f:
        f.truncate(size)
    with pytest.raises(StoreError, match=rf"good.bin has {size} bytes but good.idx's sequences hold 6 uint16 tokens "
                                         rf"\(12 bytes\): the .bin is {problem}"):
        TokenStore.open(good)


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_a_missing_half_is_named(good, missing):
    os.remove(f"{good}.{missing}")
    with pytest.raises(StoreError, match=rf"good.{missing} is missing: a Megatron-LM indexed dataset is .*good.bin"):
        TokenStore.open(good)


def test_a_short_header_and_an_empty_index(good):
    for content in (b"MMIDIDX\x00\x00\x01", b""):
        open(f"{good}.idx", "wb").write(content)
        with pytest.raises(StoreError, match="not a Megatron-LM index"):
            TokenStore.open(good)


# --- export: Megatron -------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size, dtype", [(50257, np.uint16), (100_000, np.int32)])
def test_export_megatron_reads_back_in_megatron_core(tmp_path, vocab_size, dtype):
    docs = [[1, 2, 3], [], [vocab_size - 1], [7] * 20]
    store = write_store(tmp_path / "s", docs, vocab_size=vocab_size)
    summary = export_store(store, tmp_path / "out" / "x_text_document", format="megatron")
    assert "4 documents, 3 sequences, 24 tokens" in summary
    dataset = IndexedDataset(str(tmp_path / "out" / "x_text_document"))
    assert dataset.index.dtype == dtype
    assert megatron_documents(tmp_path / "out" / "x_text_document") == docs
    assert store_documents(TokenStore.open(tmp_path / "out" / "x_text_document.idx")) == docs
    assert sorted(os.listdir(tmp_path / "out")) == ["x_text_document.bin", "x_text_document.idx"]


@settings(max_examples=25, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 999), max_size=12), max_size=25), chunk=st.integers(1, 9),
       max_sequence=st.integers(1, 7))
def test_export_megatron_streams_in_chunks_and_splits_long_documents(tmp_path_factory, docs, chunk, max_sequence):
    assume(any(docs))  # megatron-core cannot memory-map an empty .bin
    tmp = tmp_path_factory.mktemp("x")
    store = write_store(tmp / "s", docs, vocab_size=1000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_CHUNK_ITEMS", chunk)
        patch.setattr(export_module, "MAX_SEQUENCE_LENGTH", max_sequence)
        export_store(store, tmp / "m", format="megatron")
    assert megatron_documents(tmp / "m") == docs
    assert max(IndexedDataset(str(tmp / "m")).sequence_lengths, default=0) <= max_sequence


def test_a_sentence_split_dataset_exports_one_sequence_per_document(tmp_path):
    prefix = build(tmp_path / "split", [[[1, 2], [3]], [], [[4], [5, 6]]], np.int32)
    export_store(prefix, tmp_path / "whole", format="megatron")
    assert megatron_documents(tmp_path / "whole") == [[1, 2, 3], [], [4, 5, 6]]
    assert IndexedDataset(str(tmp_path / "whole")).index.dtype == np.int32
    assert list(IndexedDataset(str(tmp_path / "whole")).sequence_lengths) == [3, 3]


def test_export_refuses_to_overwrite_unless_told_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    store = write_store(tmp_path / "s", [[1, 2], [3]])
    export_store(store, tmp_path / "m", format="megatron")
    before = open(tmp_path / "m.bin", "rb").read()
    with pytest.raises(FileExistsError, match=r"m.idx already exists; pass overwrite=True \(--overwrite\)"):
        export_store(store, tmp_path / "m", format="megatron")
    other = write_store(tmp_path / "t", [[9, 9, 9]])
    def fail_midway(offsets):
        yield np.ones(1, np.int64), np.zeros(1, np.int64)
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "_sequences", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        export_store(other, tmp_path / "m", format="megatron", overwrite=True)
    monkeypatch.undo()
    assert open(tmp_path / "m.bin", "rb").read() == before and megatron_documents(tmp_path / "m") == [[1, 2], [3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.idx", "s", "t"]
    export_store(other, tmp_path / "m", format="megatron", overwrite=True)
    assert megatron_documents(tmp_path / "m") == [[9, 9, 9]]


# --- export: nanoGPT ---------------------------------------------------------------------------------------

def nanogpt_read(path):
    return np.memmap(path, dtype=np.uint16, mode="r").tolist()  # as nanoGPT's train.py reads train.bin


@settings(max_examples=25, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 9), max_size=8), max_size=20), chunk=st.integers(1, 9))
def test_nanogpt_export_appends_the_end_of_text_where_a_document_lacks_it(tmp_path_factory, docs, chunk):
    tmp = tmp_path_factory.mktemp("n")
    store = write_store(tmp / "s", docs, vocab_size=10, eos=9)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_CHUNK_ITEMS", chunk)
        summary = export_store(store, tmp / "train.bin", format="nanogpt")
    expected = ref_nanogpt_tokens(docs, 9)
    assert nanogpt_read(tmp / "train.bin") == expected if expected else os.path.getsize(tmp / "train.bin") == 0
    assert f"{len(expected) - sum(map(len, docs)):,} end-of-text ids (9) added" in summary


def test_nanogpt_export_of_a_store_prepared_with_append_eos_adds_nothing(tmp_path, gpt2_tok):
    texts = [line for line in wikitext_lines("valid")[:200] if line]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    store = prepare([corpus], tmp_path / "s", tokenizer=gpt2_tok, append_eos=True, progress=False)
    assert "0 end-of-text ids" in export_store(store, tmp_path / "train.bin", format="nanogpt")
    # nanoGPT's openwebtext/prepare.py: enc.encode_ordinary(text), then the eot token, for every record
    expected = [t for text in texts for t in gpt2_tok(text)["input_ids"] + [GPT2_EOD]]
    assert nanogpt_read(tmp_path / "train.bin") == expected


def test_nanogpt_export_refusals(tmp_path):
    big = write_store(tmp_path / "big", [[1]], vocab_size=70_000, eos=0)
    with pytest.raises(ValueError, match="a vocabulary of 70,000 ids; nanoGPT.s uint16 token files hold ids below"):
        export_store(big, tmp_path / "a.bin", format="nanogpt")
    megatron = build(tmp_path / "m", [[[1, 2]]], np.int32)
    with pytest.raises(ValueError, match=r"records no end-of-text \(eos\) id: pass eot_id \(--eot-id\)"):
        export_store(megatron, tmp_path / "b.bin", format="nanogpt")
    assert "0 end-of-text ids (2) added" in export_store(megatron, tmp_path / "b.bin", format="nanogpt", eot_id=2)
    assert nanogpt_read(tmp_path / "b.bin") == [1, 2]
    wide = build(tmp_path / "w", [[[1, 70_000]]], np.int32)
    with pytest.raises(ValueError, match="holds token id 70,000; nanoGPT's uint16"):
        export_store(wide, tmp_path / "c.bin", format="nanogpt", eot_id=2)
    with pytest.raises(ValueError, match=r"end-of-text id must be an integer in \[0, 65536\)"):
        export_store(megatron, tmp_path / "c.bin", format="nanogpt", eot_id=65536)
    with pytest.raises(ValueError, match="format must be one of"):
        export_store(megatron, tmp_path / "c.bin", format="fairseq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "big", "m.bin", "m.idx", "w.bin", "w.idx"]


# --- prepare: JSON lines as Megatron's preprocess_data.py --------------------------------------------------

@pytest.fixture(scope="module")
def megatron_gpt2(gpt2_tok, tmp_path_factory):
    """megatron-core's own tokenizer over the GPT-2 files (MegatronTokenizer reads a save_pretrained directory)."""
    from megatron.core.tokenizers import MegatronTokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    gpt2_tok.save_pretrained(directory)
    metadata = {"library": "huggingface", "model_type": "gpt"}
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(directory), metadata_path=metadata, use_fast=True)


def megatron_preprocess(jsonl, prefix, tokenizer):
    """Megatron-LM's tools/preprocess_data.py --append-eod, one worker (the script is not in the megatron-core
    package and needs megatron.training): json.loads each line, tokenizer.tokenize its "text", append
    tokenizer.eod when the document has tokens, add_document to megatron-core's IndexedDatasetBuilder in
    DType.optimal_dtype(vocab_size) (uint16 for GPT-2)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size))
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = list(tokenizer.tokenize(json.loads(line)["text"]))
            if ids:
                ids.append(tokenizer.eod)
            builder.add_document(np.array(ids, np.int64), [len(ids)] if ids else [])
    builder.finalize(f"{prefix}.idx")


def test_prepare_jsonl_with_append_eos_gives_megatrons_tokens_and_documents(tmp_path, megatron_gpt2):
    # WikiText-2 valid, one record per line, blank lines (" \n") included: 3,760 documents for both.
    lines = list(open_lines())
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    megatron_preprocess(corpus, tmp_path / "megatron_text_document", megatron_gpt2)
    gpt2 = str(fixture_path("tokenizers", "gpt2"))
    assert main(["prepare", str(corpus), "-o", str(tmp_path / "fastlm"), "--tokenizer", gpt2, "--append-eos",
                 "--no-progress"]) == 0
    ours, theirs = TokenStore.open(tmp_path / "fastlm"), TokenStore.open(tmp_path / "megatron_text_document")
    assert len(ours) == len(theirs) == len(lines) == 3760
    assert np.array_equal(np.diff(ours.offsets), np.diff(theirs.offsets))
    assert np.array_equal(ours.tokens, theirs.tokens)
    # fastlm's export of it is Megatron's dataset byte for byte
    assert main(["export", str(tmp_path / "fastlm"), "-o", str(tmp_path / "exported"), "--format", "megatron"]) == 0
    for suffix in (".bin", ".idx"):
        exported = (tmp_path / f"exported{suffix}").read_bytes()
        assert exported == (tmp_path / f"megatron_text_document{suffix}").read_bytes()


def open_lines():
    """WikiText-2 valid's raw lines, each with its newline, the blank ones (" \\n") too."""
    import lzma

    with lzma.open(fixture_path("wikitext-2-raw", "wiki.valid.raw.xz"), "rt", encoding="utf-8") as f:
        yield from f


def test_every_record_is_a_document_whitespace_and_empty_ones_too(tmp_path, gpt2_tok, megatron_gpt2):
    texts = ["a", " \n", "", "\t", "b"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    store = prepare([corpus], tmp_path / "s", tokenizer=gpt2_tok, append_eos=True, progress=False)
    assert store_documents(store) == [gpt2_tok(t)["input_ids"] + [GPT2_EOD] for t in texts]
    # Megatron leaves the eod out of the empty record's document (it has no tokens); nanoGPT does not.
    megatron_preprocess(corpus, tmp_path / "m", megatron_gpt2)
    theirs = store_documents(TokenStore.open(tmp_path / "m"))
    assert theirs[2] == [] and theirs[:2] + theirs[3:] == store_documents(store)[:2] + store_documents(store)[3:]


# --- the command line ----------------------------------------------------------------------------------------

def test_inspect_a_megatron_dataset(tmp_path, gpt2_tok, capsys):
    ids = gpt2_tok("Hello world")["input_ids"]
    prefix = build(tmp_path / "d", [[ids]])
    assert main(["inspect", f"{prefix}.bin"]) == 0
    out = capsys.readouterr().out
    assert '"format": "megatron-indexed-dataset"' in out and "records no tokenizer; pass --tokenizer" in out
    assert main(["inspect", prefix, "--tokenizer", str(fixture_path("tokenizers", "gpt2"))]) == 0
    assert "--- document 0 (2 tokens)\nHello world\n" in capsys.readouterr().out


def test_export_on_the_command_line(tmp_path, capsys):
    store = write_store(tmp_path / "s", [[1, 2], [3]], eos=3)
    assert main(["export", str(store.path), "-o", str(tmp_path / "train.bin"), "--format", "nanogpt"]) == 0
    assert "train.bin: 4 tokens (uint16), 2 documents, 1 end-of-text ids (3) added" in capsys.readouterr().out
    assert nanogpt_read(tmp_path / "train.bin") == [1, 2, 3, 3]
    assert main(["export", str(store.path), "-o", str(tmp_path / "train.bin"), "--format", "nanogpt"]) == 2
    assert capsys.readouterr().err.startswith("fastlm export: error: ")
    assert main(["export", str(store.path), "-o", str(tmp_path / "m"), "--format", "megatron"]) == 0
    assert megatron_documents(tmp_path / "m") == [[1, 2], [3]]


def test_inspect_tokenizer_must_be_the_one_a_fastlm_store_was_made_with(tmp_path, gpt2_tok, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello world\n", encoding="utf-8")
    prepare([corpus], tmp_path / "s", tokenizer=gpt2_tok, progress=False)
    assert main(["inspect", str(tmp_path / "s"), "--tokenizer", str(fixture_path("tokenizers", "gpt2"))]) == 0
    assert "Hello world" in capsys.readouterr().out
    bert = str(fixture_path("tokenizers", "bert-base-uncased", "vocab.txt"))
    assert main(["inspect", str(tmp_path / "s"), "--tokenizer", bert]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err


def test_the_megatron_modules_stay_light():
    code = ("import sys, fastlm.megatron, fastlm.export; "
            "print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


UNDER_A_LIMIT = "import sys; from fastlm.cli import main; sys.exit(main(sys.argv[1:]))"


def export_under_a_limit(limit, *args):
    """`fastlm export ARGS` in a process whose files may not grow past ``limit`` bytes."""
    from tests.test_prepare import file_size_limit

    return subprocess.run([sys.executable, "-c", UNDER_A_LIMIT, "export", *map(str, args)], capture_output=True,
                          text=True, preexec_fn=file_size_limit(limit), timeout=120)


@pytest.mark.parametrize("format, docs, fails_in", [
    ("megatron", [list(range(1000))] * 4, "m.bin"),  # 8 kB of tokens, a 100-byte index
    ("megatron", [[1]] * 400, "m.idx"),  # 800 bytes of tokens, an 8 kB index
    ("nanogpt", [list(range(1000))] * 4, "m"),
], ids=["megatron-tokens", "megatron-index", "nanogpt"])
def test_an_export_past_the_file_size_limit_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, format, docs,
                                                                                           fails_in):
    # Was `fastlm export: error: [Errno 27] File too large` (exit 2), naming no file.
    store = write_store(tmp_path / "s", docs, eos=1)
    result = export_under_a_limit(4096, store.path, "-o", tmp_path / "out" / "m", "--format", format)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr == (f"fastlm export: error: cannot write {tmp_path / 'out' / fails_in}: File too large (errno 27); "
                             "nothing was written (free space there, or raise the file-size limit: ulimit -f)\n")
    assert list((tmp_path / "out").iterdir()) == []
