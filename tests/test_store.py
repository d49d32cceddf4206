"""fastlm.store: format, validation on open, atomic streaming writer, merge, temporary directories."""
import json
import os
import re
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import store as store_module
from fastlm.store import StoreError, StoreWriter, TokenStore, dtype_for_vocab, merge_stores

META = {"tokenizer_fingerprint": "abc", "special_ids": {"eos": 2}, "source": ["unit-test"]}


def write_store(path, docs, *, vocab_size=1000, meta=META, batches=2, overwrite=False):
    """Write ``docs`` (lists of ids) through the streaming writer in ``batches`` append calls."""
    with StoreWriter(path, vocab_size=vocab_size, overwrite=overwrite) as writer:
        for part in np.array_split(np.arange(len(docs)), batches) if docs else []:
            chunk = [docs[i] for i in part]
            lengths = np.array([len(d) for d in chunk], np.int64)
            tokens = np.array([t for d in chunk for t in d], np.int64)
            writer.append(tokens, lengths)
        return writer.close(meta)


DOCS = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9], [999, 0]]


def test_round_trip_layout_and_views(tmp_path):
    store = write_store(tmp_path / "s", DOCS)
    assert len(store) == len(DOCS)
    assert store.tokens.dtype == np.uint16 and store.offsets.dtype == np.int64
    assert isinstance(store.tokens, np.memmap) and not store.tokens.flags.writeable
    assert store.offsets.tolist() == [0, 3, 3, 4, 9, 11]
    assert [store.doc(i).tolist() for i in range(len(DOCS))] == DOCS
    assert store[-1].tolist() == [999, 0]
    assert [d.tolist() for d in store] == DOCS
    assert store.meta["n_docs"] == 5 and store.meta["n_tokens"] == 11
    assert store.meta["special_ids"]["eos"] == 2 and store.meta["special_ids"]["pad"] is None
    assert store.tokenizer_dir == tmp_path / "s" / "tokenizer"
    reopened = TokenStore.open(tmp_path / "s", verify=True)
    np.testing.assert_array_equal(reopened.tokens, store.tokens)


def test_slices_share_the_memmap_and_rebase_offsets(tmp_path):
    store = write_store(tmp_path / "s", DOCS)
    view = store[2:4]
    assert len(view) == 2
    assert view.offsets.tolist() == [0, 1, 6]
    assert [d.tolist() for d in view] == DOCS[2:4]
    assert np.shares_memory(view.tokens, store.tokens)
    assert len(store[4:2]) == 0
    with pytest.raises(ValueError, match="contiguous"):
        store[::2]
    batches = list(store.iter_batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [d.tolist() for b in batches for d in b] == DOCS


def test_doc_index_errors(tmp_path):
    store = write_store(tmp_path / "s", DOCS)
    with pytest.raises(IndexError, match="out of range"):
        store.doc(5)
    with pytest.raises(TypeError, match="integer"):
        store.doc(1.0)
    with pytest.raises(ValueError, match="positive"):
        next(store.iter_batches(0))


@pytest.mark.parametrize(
    "vocab_size, dtype", [(1, np.uint16), (65536, np.uint16), (65537, np.uint32), (2**32, np.uint32)]
)
def test_dtype_is_the_smallest_that_holds_every_id(vocab_size, dtype):
    assert dtype_for_vocab(vocab_size) == dtype


def test_dtype_rejects_impossible_vocabularies():
    for bad in (0, -1, 2**32 + 1, 3.0, True):
        with pytest.raises(ValueError):
            dtype_for_vocab(bad)


def test_uint32_store_keeps_ids_above_65535(tmp_path):
    docs = [[65535, 65536, 70000], [0]]
    store = write_store(tmp_path / "s", docs, vocab_size=70001)
    assert store.tokens.dtype == np.uint32
    assert [d.tolist() for d in store] == docs


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_store(tmp_path / "s", [[1, 10]], vocab_size=10)
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_lengths_that_do_not_match(tmp_path):
    with pytest.raises(ValueError, match="sum to"):
        with StoreWriter(tmp_path / "s", vocab_size=10) as writer:
            writer.append(np.array([1, 2, 3]), np.array([2]))
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(doc_lengths=st.lists(st.integers(0, 9), max_size=60), buffer_items=st.integers(1, 7))
def test_offsets_survive_buffer_flushes(tmp_path_factory, doc_lengths, buffer_items):
    # A tiny offsets buffer forces flushes at every possible position inside an append.
    path = tmp_path_factory.mktemp("flush") / "s"
    old = store_module._OFFSET_BUFFER_ITEMS
    store_module._OFFSET_BUFFER_ITEMS = buffer_items
    try:
        docs = [list(range(n)) for n in doc_lengths]
        store = write_store(path, docs, batches=3)
    finally:
        store_module._OFFSET_BUFFER_ITEMS = old
    assert store.offsets.tolist() == [0, *np.cumsum(doc_lengths, dtype=np.int64).tolist()]
    assert [d.tolist() for d in store] == docs


def test_an_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "s", vocab_size=10) as writer:
            writer.append(np.array([1, 2]), np.array([2]))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_writer_left_without_close_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="without close"):
        with StoreWriter(tmp_path / "s", vocab_size=10) as writer:
            writer.append(np.array([1, 2]), np.array([2]))
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite_and_must_be_a_store(tmp_path):
    write_store(tmp_path / "s", DOCS)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_store(tmp_path / "s", [[7]])
    replaced = write_store(tmp_path / "s", [[7]], overwrite=True)
    assert [d.tolist() for d in replaced] == [[7]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a token store"):
        write_store(tmp_path / "mine", [[7]], overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_overwrite_never_deletes_a_directory_that_is_not_a_store(tmp_path):
    # The case: a project directory that happens to hold a meta.json.
    project = tmp_path / "proj"
    project.mkdir()
    (project / "meta.json").write_text("{}")
    (project / "thesis.tex").write_text("precious")
    lone_meta = tmp_path / "lone"
    lone_meta.mkdir()
    (lone_meta / "meta.json").write_text('{"mine": 1}')
    store_and_notes = write_store(tmp_path / "s", DOCS).path
    (store_and_notes / "notes.txt").write_text("mine")
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    for target, message in [(project, "it holds thesis.tex"), (lone_meta, "has no format"),
                            (store_and_notes, "it holds notes.txt"), (a_file, "not a token store directory")]:
        with pytest.raises(FileExistsError, match=message):
            write_store(target, [[7]], overwrite=True)
    assert (project / "thesis.tex").read_text() == "precious" and (project / "meta.json").read_text() == "{}"
    assert (lone_meta / "meta.json").read_text() == '{"mine": 1}'
    assert (store_and_notes / "notes.txt").read_text() == "mine" and len(TokenStore.open(store_and_notes)) == len(DOCS)
    assert a_file.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_a_broken_store_and_an_empty_directory(tmp_path):
    broken = write_store(tmp_path / "s", DOCS).path
    (broken / "tokens.bin").write_bytes(b"\0")
    assert [d.tolist() for d in write_store(broken, [[7]], overwrite=True)] == [[7]]
    (tmp_path / "empty").mkdir()
    assert [d.tolist() for d in write_store(tmp_path / "empty", [[7]], overwrite=True)] == [[7]]


def test_a_directory_that_appears_while_writing_is_not_replaced(tmp_path):
    # The destination is checked again when the store is renamed into place, not only when writing starts.
    with pytest.raises(FileExistsError, match="it holds mine.txt"):
        with StoreWriter(tmp_path / "s", vocab_size=10, overwrite=True) as writer:
            writer.append(np.array([1, 2]), np.array([2]))
            (tmp_path / "s").mkdir()
            (tmp_path / "s" / "mine.txt").write_text("mine")
            writer.close(META)
    assert (tmp_path / "s" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_empty_store_opens(tmp_path):
    store = write_store(tmp_path / "s", [])
    assert len(store) == 0 and store.n_tokens == 0
    assert TokenStore.open(tmp_path / "s", verify=True).offsets.tolist() == [0]


# --- detection of foreign, truncated and corrupt stores ----------------------------------------------


@pytest.fixture
def good_store(tmp_path):
    return write_store(tmp_path / "s", DOCS).path


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_missing_directory_and_meta(tmp_path, good_store):
    with pytest.raises(StoreError, match="no such directory"):
        TokenStore.open(tmp_path / "nope")
    (good_store / "meta.json").unlink()
    with pytest.raises(StoreError, match="meta.json is missing"):
        TokenStore.open(good_store)


def test_foreign_and_unknown_version(good_store):
    _edit_meta(good_store, format_version=99)
    with pytest.raises(StoreError, match="version 99"):
        TokenStore.open(good_store)
    _edit_meta(good_store, format="something-else")
    with pytest.raises(StoreError, match="not a fastlm token store"):
        TokenStore.open(good_store)
    (good_store / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        TokenStore.open(good_store)


@pytest.mark.parametrize("changes, message", [
    ({"dtype": "float32"}, "token dtype 'float32' is not uint16 or uint32"),
    ({"n_docs": "many"}, "n_docs must be an integer >= 0, got 'many'"),
    ({"n_tokens": 11.0}, "n_tokens must be an integer >= 0, got 11.0"),
    ({"n_tokens": 11.5}, "n_tokens must be an integer >= 0, got 11.5"),
    ({"n_tokens": True}, "n_tokens must be an integer >= 0, got True"),
    ({"n_tokens": None}, "n_tokens must be an integer >= 0, got None"),
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
    ({"vocab_size": 70000}, "vocab_size 70000 does not fit in uint16 token ids"),
    ({"format_version": True}, "store format version True"),
    ({"special_ids": {"eos": 5000}}, "special id eos=5000 is not an integer in [0, vocab_size=1000)"),
    ({"special_ids": {"eos": 1.5}}, "special id eos=1.5"),
    ({"special_ids": [2]}, "special_ids must be an object"),
    ({"max_token_id": 1000}, "max_token_id must be an integer in [0, vocab_size=1000), got 1000"),
    ({"max_token_id": "999"}, "max_token_id must be an integer"),
    ({"checksums": ["abc"]}, "checksums must map file names to sha256 strings"),
    ({"byteorder": "big" if sys.byteorder == "little" else "little"}, "-endian machine"),
])
def test_meta_fields_are_checked_on_open(good_store, changes, message):
    _edit_meta(good_store, **changes)
    with pytest.raises(StoreError, match=re.escape(message)):
        TokenStore.open(good_store)


def test_missing_and_unrepresentable_counts(good_store):
    meta = json.loads((good_store / "meta.json").read_text())
    del meta["n_docs"]
    (good_store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="the field 'n_docs' is missing"):
        TokenStore.open(good_store)
    # JSON has no integer limit: 1e400 parses to inf, which int() cannot take (OverflowError).
    (good_store / "meta.json").write_text(json.dumps({**meta, "n_docs": 5}).replace('"n_tokens": 11', '"n_tokens": 1e400'))
    with pytest.raises(StoreError, match="n_tokens must be an integer >= 0, got inf"):
        TokenStore.open(good_store)


@pytest.mark.parametrize("name", ["tokens.bin", "offsets.bin"])
def test_truncated_files(good_store, name):
    data = (good_store / name).read_bytes()
    (good_store / name).write_bytes(data[:-2])
    with pytest.raises(StoreError, match="truncated"):
        TokenStore.open(good_store)
    (good_store / name).unlink()
    with pytest.raises(StoreError, match="missing"):
        TokenStore.open(good_store)


def test_decreasing_offsets(good_store):
    offsets = np.fromfile(good_store / "offsets.bin", np.int64)
    offsets[2] = 10
    offsets.tofile(good_store / "offsets.bin")
    with pytest.raises(StoreError, match="decrease at document 2"):
        TokenStore.open(good_store)


def test_offsets_that_do_not_cover_the_tokens(good_store):
    offsets = np.fromfile(good_store / "offsets.bin", np.int64)
    offsets[-1] -= 1
    offsets.tofile(good_store / "offsets.bin")
    with pytest.raises(StoreError, match="expected 0 to n_tokens=11"):
        TokenStore.open(good_store)


def test_flipped_token_is_caught_by_verify_only(good_store):
    data = bytearray((good_store / "tokens.bin").read_bytes())
    data[0] ^= 1
    (good_store / "tokens.bin").write_bytes(bytes(data))
    assert TokenStore.open(good_store).doc(0).tolist() == [0, 2, 3]
    with pytest.raises(StoreError, match="tokens.bin is corrupt: sha256"):
        TokenStore.open(good_store, verify=True)


# --- merge ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_items", [1, 2, 1 << 24])
def test_merge_equals_writing_everything_at_once(tmp_path, monkeypatch, chunk_items):
    monkeypatch.setattr(store_module, "_CHUNK_ITEMS", chunk_items)
    parts = [DOCS[:2], DOCS[2:3], DOCS[3:]]
    shards = [write_store(tmp_path / f"shard{i}", docs, meta={**META, "source": [f"part{i}"]}) for i, docs in enumerate(parts)]
    (shards[0].tokenizer_dir).mkdir()
    (shards[0].tokenizer_dir / "tokenizer.json").write_text("{}")
    merged = merge_stores([shards[0].path, shards[1], shards[2].path], tmp_path / "merged")
    whole = write_store(tmp_path / "whole", DOCS)
    np.testing.assert_array_equal(merged.tokens, whole.tokens)
    np.testing.assert_array_equal(merged.offsets, whole.offsets)
    assert merged.meta["checksums"] == whole.meta["checksums"]
    assert merged.meta["source"] == ["part0", "part1", "part2"]
    # Recomputed over all shards, not copied from the first shard's meta (whose maximum is 3).
    assert shards[0].meta["max_token_id"] == 3 and merged.meta["max_token_id"] == 999
    assert (merged.tokenizer_dir / "tokenizer.json").read_text() == "{}"
    TokenStore.open(merged.path, verify=True)


def test_merge_refuses_different_tokenizers(tmp_path):
    a = write_store(tmp_path / "a", DOCS)
    b = write_store(tmp_path / "b", DOCS, meta={**META, "tokenizer_fingerprint": "other"})
    with pytest.raises(ValueError, match="tokenizer_fingerprint differs"):
        merge_stores([a, b], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="at least one"):
        merge_stores([], tmp_path / "m")


def test_offsets_past_2_to_the_32(tmp_path):
    # fairseq's test_4billion_tokens: a sparse 8 GiB token file, so nothing is actually written.
    big = 2**32 + 5
    path = tmp_path / "big"
    path.mkdir()
    with open(path / "tokens.bin", "wb") as f:
        f.truncate((big + 3) * 2)
        f.seek(big * 2)
        f.write(np.array([7, 8, 9], np.uint16).tobytes())
    np.array([0, big, big + 3], np.int64).tofile(path / "offsets.bin")
    meta = {"format": "fastlm-token-store", "format_version": 1, "dtype": "uint16", "vocab_size": 10,
            "n_docs": 2, "n_tokens": big + 3, "special_ids": {}}
    (path / "meta.json").write_text(json.dumps(meta))
    store = TokenStore.open(path)
    assert store.doc(1).tolist() == [7, 8, 9]
    assert store[1:].offsets.tolist() == [0, 3] and store[1:].doc(0).tolist() == [7, 8, 9]
    assert store.doc(0).shape == (big,)


@pytest.mark.parametrize("specials, expected", [({"pad": 1, "eos": 2}, 1), ({"eos": 2}, 2), ({}, 0)])
def test_pad_id_falls_back_to_eos_then_zero(tmp_path, specials, expected):
    store = write_store(tmp_path / "s", DOCS, meta={**META, "special_ids": specials})
    assert store.pad_id == expected


# --- the maximum token id (checked against a model's embedding size before training) ----------------------


def test_max_token_id_is_recorded_in_meta(tmp_path):
    store = write_store(tmp_path / "s", DOCS)
    assert store.meta["max_token_id"] == 999 and store.max_token_id == 999
    assert store[:1].max_token_id == 3 and store[1:2].max_token_id is None
    empty = write_store(tmp_path / "e", [])
    assert empty.meta["max_token_id"] is None and empty.max_token_id is None


def test_max_token_id_of_an_older_store_is_computed_without_touching_it(good_store):
    meta = json.loads((good_store / "meta.json").read_text())
    del meta["max_token_id"]
    (good_store / "meta.json").write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in good_store.iterdir()}
    store = TokenStore.open(good_store, verify=True)
    assert store.max_token_id == 999
    assert {p.name: p.read_bytes() for p in good_store.iterdir()} == before


# --- temporary directories left by killed runs -------------------------------------------------------------

MAKE_TEMP_DIR = """
import sys, time
from fastlm.store import temp_dir_beside
print(temp_dir_beside(sys.argv[1]), flush=True)
time.sleep(float(sys.argv[2]))
"""


def _edit_owner(path, **changes):
    owner_file = path / store_module._OWNER_FILE
    owner_file.write_text(json.dumps({**json.loads(owner_file.read_text()), **changes}))


def test_the_next_writer_removes_dead_runs_temp_dirs_and_keeps_live_ones(tmp_path):
    dest = tmp_path / "s"
    finished = subprocess.run([sys.executable, "-c", MAKE_TEMP_DIR, str(dest), "0"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    dead = finished.stdout.strip()
    running = subprocess.Popen([sys.executable, "-c", MAKE_TEMP_DIR, str(dest), "60"], stdout=subprocess.PIPE, text=True)
    try:
        live = running.stdout.readline().strip()
        ours = store_module.temp_dir_beside(dest)
        pid_reused = store_module.temp_dir_beside(dest)
        _edit_owner(pid_reused, start=-1)  # our pid, but a process that started at another time
        rebooted = store_module.temp_dir_beside(dest)
        _edit_owner(rebooted, boot="an earlier boot")
        other_host = store_module.temp_dir_beside(dest)
        _edit_owner(other_host, host="another-machine", pid=1 << 30)  # cannot be checked from here: kept
        no_owner = tmp_path / ".s.tmp-made-by-hand"
        no_owner.mkdir()
        store = write_store(dest, DOCS)
        left = {str(p) for p in tmp_path.iterdir() if p.name.startswith(".s.")}
        assert left == {live, str(ours), str(other_host), str(no_owner)} and dead not in left
        # The finished store holds no owner record.
        assert sorted(p.name for p in store.path.iterdir()) == ["meta.json", "offsets.bin", "tokens.bin"]
        running.kill()
        # Wait for the end without reaping it: a zombie has ended too.
        os.waitid(os.P_PID, running.pid, os.WEXITED | os.WNOWAIT)
        assert store_module.remove_stale_temp_dirs(dest) == [Path(live)]
    finally:
        running.kill()
        running.wait()


# --- text bytes per document (bytes.bin) and documents appended in parts ----------------------------------


def write_with_bytes(path, docs, doc_bytes, *, batches=2):
    with StoreWriter(path, vocab_size=1000, record_bytes=True) as writer:
        for part in np.array_split(np.arange(len(docs)), batches):
            writer.append(np.array([t for i in part for t in docs[i]], np.int64), [len(docs[i]) for i in part],
                          [doc_bytes[i] for i in part])
        return writer.close(META)


def test_doc_bytes_round_trip_slice_and_verify(tmp_path):
    doc_bytes = [12, 0, 3, 40, 7]
    store = write_with_bytes(tmp_path / "s", DOCS, doc_bytes)
    assert store.doc_bytes.tolist() == doc_bytes and store.doc_bytes.dtype == np.int64
    assert store.n_bytes == 62 == store.meta["n_bytes"] and "bytes.bin" in store.meta["checksums"]
    assert store[1:4].doc_bytes.tolist() == [0, 3, 40] and store[1:4].n_bytes == 43
    assert TokenStore.open(tmp_path / "s", verify=True).doc_bytes.tolist() == doc_bytes
    data = bytearray((tmp_path / "s" / "bytes.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "s" / "bytes.bin").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="bytes.bin is corrupt: sha256"):
        TokenStore.open(tmp_path / "s", verify=True)
    (tmp_path / "s" / "bytes.bin").write_bytes(bytes(data[:-8]))
    with pytest.raises(StoreError, match="bytes.bin has 32 bytes .* truncated"):
        TokenStore.open(tmp_path / "s")


def test_stores_without_doc_bytes_still_open(tmp_path):
    # Stores written before bytes.bin existed: no file, no checksum for it.
    store = write_store(tmp_path / "s", DOCS)
    assert not (tmp_path / "s" / "bytes.bin").exists() and "n_bytes" not in store.meta
    reopened = TokenStore.open(tmp_path / "s", verify=True)
    assert reopened.doc_bytes is None and reopened.n_bytes is None and reopened[1:3].doc_bytes is None


def test_a_document_appended_in_parts(tmp_path):
    with StoreWriter(tmp_path / "s", vocab_size=1000, record_bytes=True) as writer:
        writer.append([1, 2, 3, 4], [1, 3], [5, 6], open_last=True)  # doc 0 whole, doc 1 begins
        writer.append([5], [1], [7], open_last=True)                  # doc 1 goes on
        writer.append([6, 7, 8], [1, 2], [8, 9])                       # doc 1 ends, doc 2 whole
        store = writer.close(META)
    assert [d.tolist() for d in store] == [[1], [2, 3, 4, 5, 6], [7, 8]]
    assert store.doc_bytes.tolist() == [5, 21, 9]
    with pytest.raises(RuntimeError, match="left open"):
        with StoreWriter(tmp_path / "t", vocab_size=10) as writer:
            writer.append([1], [1], open_last=True)
            writer.close(META)
    assert not (tmp_path / "t").exists()


def test_doc_bytes_must_match_the_writer(tmp_path):
    with StoreWriter(tmp_path / "s", vocab_size=10, record_bytes=True) as writer:
        with pytest.raises(ValueError, match="pass doc_bytes"):
            writer.append([1], [1])
        with pytest.raises(ValueError, match="one per document"):
            writer.append([1, 2], [1, 1], [3])
        with pytest.raises(ValueError, match="one per document"):
            writer.append([1], [1], [-1])
        writer.abort()
    with StoreWriter(tmp_path / "t", vocab_size=10) as writer:
        with pytest.raises(ValueError, match="record_bytes"):
            writer.append([1], [1], [3])
        writer.abort()


def test_merge_keeps_doc_bytes_only_when_every_shard_has_them(tmp_path):
    doc_bytes = [12, 0, 3, 40, 7]
    a = write_with_bytes(tmp_path / "a", DOCS[:2], doc_bytes[:2], batches=1)
    b = write_with_bytes(tmp_path / "b", DOCS[2:], doc_bytes[2:], batches=1)
    merged = merge_stores([a, b], tmp_path / "m")
    whole = write_with_bytes(tmp_path / "w", DOCS, doc_bytes)
    assert merged.doc_bytes.tolist() == doc_bytes and merged.meta["n_bytes"] == 62
    assert merged.meta["checksums"] == whole.meta["checksums"]
    old = write_store(tmp_path / "old", DOCS[:1])
    mixed = merge_stores([a, old], tmp_path / "mixed")
    assert mixed.doc_bytes is None and "bytes.bin" not in mixed.meta["checksums"]
