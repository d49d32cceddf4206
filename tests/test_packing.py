import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlm
from fastlm.packing import IGNORE_INDEX, pack_blocks, pack_documents
from tests.reference import (
    chain_group_texts,
    documents,
    ref_best_fit_decreasing,
    ref_break_mode,
    ref_document_units,
    ref_one_document_per_block,
    ref_pack_blocks,
    ref_packed_row,
    ref_pieces,
    seed_group_texts,
)

DTYPES = [np.uint16, np.uint32, np.int32, np.int64]
CONTAINERS = ["array", "readonly", "memmap"]


def make_tokens(docs, dtype, container, tmp_dir=None):
    """Flat tokens + offsets for `docs`, as a plain array, a read-only array or a read-only memmap."""
    flat = np.array([t for doc in docs for t in doc], dtype=dtype)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    if container == "readonly":
        flat.setflags(write=False)
    elif container == "memmap":
        import tempfile

        path = tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".bin", delete=False).name
        flat.tofile(path)
        # An empty file cannot be memory-mapped; numpy refuses, so use an empty array as a store would.
        flat = np.memmap(path, dtype=dtype, mode="r") if flat.size else np.empty(0, dtype=dtype)
    return flat, offsets


@pytest.fixture(scope="module")
def memmap_dir(tmp_path_factory):
    """Where make_tokens writes its memmaps: pytest prunes it, unlike the system temp directory."""
    return tmp_path_factory.mktemp("tokens")


docs_strategy = st.lists(st.lists(st.integers(0, 65535), max_size=40), max_size=12)


def rows_of(batch):
    return [
        (list(batch["input_ids"][r]), list(batch["labels"][r]), list(batch["attention_mask"][r]))
        for r in range(batch["input_ids"].shape[0])
    ]


@settings(max_examples=150, deadline=None)
@given(
    docs=docs_strategy,
    dtype=st.sampled_from(DTYPES),
    container=st.sampled_from(CONTAINERS),
    block_size=st.integers(1, 20),
    remainder=st.sampled_from(["drop", "pad", "keep"]),
    separator=st.one_of(st.none(), st.integers(0, 65535)),
    stride_fraction=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_pack_blocks_matches_reference(memmap_dir, docs, dtype, container, block_size, remainder, separator,
                                       stride_fraction):
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    stride = None if stride_fraction is None else max(1, int(block_size * stride_fraction))
    blocks = pack_blocks(tokens, offsets, block_size, remainder=remainder, separator=separator,
                         stride=stride, pad_id=7)
    expected = ref_pack_blocks(tokens, offsets, block_size, remainder, separator, stride, pad_id=7)
    assert len(blocks) == len(expected)
    assert rows_of(blocks.gather(np.arange(len(blocks)))) == expected
    if remainder == "keep":
        assert list(blocks.lengths) == [sum(mask) for _, _, mask in expected]
    assert np.shares_memory(blocks.tokens, tokens) or tokens.size == 0


@settings(max_examples=150, deadline=None)
@given(
    docs=docs_strategy,
    dtype=st.sampled_from(DTYPES),
    container=st.sampled_from(CONTAINERS),
    block_size=st.integers(1, 20),
    group_size=st.integers(1, 5),
    remainder=st.sampled_from(["drop", "pad"]),
    separator=st.one_of(st.none(), st.integers(0, 65535)),
)
def test_pack_blocks_per_group_matches_reference(memmap_dir, docs, dtype, container, block_size, group_size,
                                                 remainder, separator):
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    blocks = pack_blocks(tokens, offsets, block_size, group_size=group_size, remainder=remainder,
                         separator=separator, pad_id=3)
    expected = ref_pack_blocks(tokens, offsets, block_size, remainder, separator, None, group_size, pad_id=3)
    assert rows_of(blocks.gather(np.arange(len(blocks)))) == expected


@settings(max_examples=100, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 50000), max_size=30), max_size=30),
       block_size=st.integers(1, 16), group_size=st.integers(1, 8))
def test_group_size_reproduces_the_tutorial_map_batches(docs, block_size, group_size):
    """datasets.map(batched=True, batch_size=G) calls group_texts on each G rows: same blocks, same order."""
    expected = []
    for i in range(0, len(docs), group_size):
        expected += seed_group_texts({"input_ids": docs[i:i + group_size]}, block_size)["input_ids"]
    tokens, offsets = make_tokens(docs, np.uint16, "array")
    blocks = pack_blocks(tokens, offsets, block_size, group_size=group_size)
    assert blocks.gather(np.arange(len(blocks)))["input_ids"].tolist() == expected


@settings(max_examples=150, deadline=None)
@given(
    docs=docs_strategy,
    dtype=st.sampled_from(DTYPES),
    container=st.sampled_from(CONTAINERS),
    block_size=st.integers(1, 24),
    overlong=st.sampled_from(["split", "truncate"]),
)
def test_pack_documents_matches_reference(memmap_dir, docs, dtype, container, block_size, overlong):
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    packed = pack_documents(tokens, offsets, block_size, overlong=overlong, pad_id=5)
    pieces = ref_pieces(tokens, offsets, block_size, overlong)
    assert len(packed) == ref_best_fit_decreasing([len(p) for p in pieces], block_size)

    batch = packed.gather(np.arange(len(packed)))
    found = []
    for r in range(len(packed)):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        mask, positions = batch["attention_mask"][r], batch["position_ids"][r]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "real tokens first, then padding"
        assert (ids[n:] == 5).all() and (labels[n:] == IGNORE_INDEX).all()
        starts = list(np.flatnonzero(positions[:n] == 0)) + [n]
        for a, b in zip(starts[:-1], starts[1:]):
            found.append(list(ids[a:b]))
            assert list(positions[a:b]) == list(range(b - a))
            assert labels[a] == IGNORE_INDEX, "the loss is masked at every document start"
            assert list(labels[a + 1:b]) == list(ids[a + 1:b])
    assert sorted(found) == sorted(pieces), "every piece placed exactly once, no token lost or invented"
    assert packed.n_tokens == sum(map(len, pieces))
    assert packed.n_dropped == sum(map(len, documents(tokens, offsets))) - packed.n_tokens


# --- break modes (fairseq's TokenBlockDataset "complete" and "eos") -----------------------------------

def _width(block_size, expected_blocks):
    """Rows are block_size wide, or as wide as the longest unit (a document kept whole)."""
    return max([block_size] + [len(unit) for block in expected_blocks for unit in block])


@settings(max_examples=150, deadline=None)
@given(
    docs=docs_strategy,
    dtype=st.sampled_from(DTYPES),
    container=st.sampled_from(CONTAINERS),
    block_size=st.integers(1, 20),
    break_mode=st.sampled_from(["complete", "eos"]),
    overlong=st.sampled_from(["split", "truncate", "keep"]),
    separator=st.one_of(st.none(), st.integers(0, 65535)),
)
def test_pack_blocks_break_modes_match_reference(memmap_dir, docs, dtype, container, block_size, break_mode,
                                                 overlong, separator):
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    blocks = pack_blocks(tokens, offsets, block_size, break_mode=break_mode, overlong=overlong,
                         separator=separator, pad_id=7)
    units = ref_document_units(tokens, offsets, block_size, overlong, separator)
    expected = ref_break_mode(units, block_size, break_mode)
    width = _width(block_size, expected)
    assert blocks.block_size == width
    rows = []
    for block in expected:
        ids = [t for unit in block for t in unit]
        pad = width - len(ids)
        rows.append((ids + [7] * pad, ids + [IGNORE_INDEX] * pad, [1] * len(ids) + [0] * pad))
    assert rows_of(blocks.gather(np.arange(len(blocks)))) == rows
    assert np.shares_memory(blocks.tokens, tokens) or tokens.size == 0


@settings(max_examples=150, deadline=None)
@given(
    docs=docs_strategy,
    dtype=st.sampled_from(DTYPES),
    container=st.sampled_from(CONTAINERS),
    block_size=st.integers(1, 20),
    break_mode=st.sampled_from(["complete", "eos"]),
    overlong=st.sampled_from(["split", "truncate", "keep"]),
)
def test_pack_documents_break_modes_match_reference(memmap_dir, docs, dtype, container, block_size, break_mode,
                                                    overlong):
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    packed = pack_documents(tokens, offsets, block_size, break_mode=break_mode, overlong=overlong, pad_id=5)
    expected = ref_break_mode(ref_document_units(tokens, offsets, block_size, overlong), block_size, break_mode)
    width = _width(block_size, expected)
    assert packed.block_size == width
    batch = packed.gather(np.arange(len(packed)))
    got = [tuple(batch[key][r].tolist() for key in ("input_ids", "labels", "attention_mask", "position_ids"))
           for r in range(len(packed))]
    assert got == [ref_packed_row(block, width, 5) for block in expected]
    assert packed.n_dropped == sum(map(len, documents(tokens, offsets))) - packed.n_tokens


@settings(max_examples=100, deadline=None)
@given(docs=docs_strategy, dtype=st.sampled_from(DTYPES), container=st.sampled_from(CONTAINERS),
       block_size=st.integers(1, 20), skip=st.integers(0, 3))
def test_eos_mode_truncated_is_the_runners_line_by_line_layout(memmap_dir, docs, dtype, container, block_size, skip):
    """pack_documents(break_mode="eos", overlong="truncate") is field for field the layout the runner's
    --line_by_line builds by hand (one non-empty document per block, truncated), so it can replace it."""
    tokens, offsets = make_tokens(docs, dtype, container, memmap_dir)
    offsets = offsets[min(skip, len(offsets) - 1):]  # documents need not start at token 0
    packed = pack_documents(tokens, offsets, block_size, break_mode="eos", overlong="truncate", pad_id=3)
    starts, lengths, dropped = ref_one_document_per_block(offsets, block_size)
    assert packed.block_size == block_size and packed.pad_id == 3 and packed.columns is None
    assert packed.block_offsets.tolist() == list(range(len(starts) + 1))
    assert packed.seg_starts.tolist() == starts and packed.seg_lengths.tolist() == lengths
    assert packed.n_dropped == dropped


@pytest.mark.parametrize("call, match", [
    (lambda t, o: pack_blocks(t, o, 4, break_mode="sentence"), "break_mode must be one of 'none', 'complete', 'eos'"),
    (lambda t, o: pack_blocks(t, o, 4, break_mode="complete", remainder="pad", pad_id=0),
     'remainder applies to break_mode="none" only'),
    (lambda t, o: pack_blocks(t, o, 4, break_mode="eos", stride=2, group_size=1),
     'stride, group_size applies to break_mode="none" only'),
    (lambda t, o: pack_blocks(t, o, 4, overlong="keep"), 'overlong applies to break_mode="complete" or "eos"'),
    (lambda t, o: pack_blocks(t, o, 4, break_mode="eos", overlong="drop"), "overlong must be one of"),
    (lambda t, o: pack_documents(t, o, 4, break_mode="none"), "break_mode must be one of 'best_fit'"),
    (lambda t, o: pack_documents(t, o, 4, overlong="keep"), 'overlong="keep" needs break_mode="complete" or "eos"'),
])
def test_break_mode_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.arange(10, dtype=np.int32), np.array([0, 4, 10]))


def test_pack_documents_fills_better_than_first_come():
    lengths = [7, 5, 3, 3, 2, 2, 1, 1]  # BFD packs these into exactly 3 blocks of 8
    tokens = np.arange(sum(lengths), dtype=np.uint16)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    packed = pack_documents(tokens, offsets, 8)
    assert len(packed) == 3 and packed.fill_rate == 1.0


def test_flatten_matches_data_collator_with_flattening_layout():
    tokens = np.arange(1, 11, dtype=np.int32)
    offsets = np.array([0, 4, 10], dtype=np.int64)
    flat = pack_documents(tokens, offsets, 8).gather([0, 1], flatten=True)
    assert flat["input_ids"].shape == (1, 10)
    assert flat["cu_seq_lens_q"].tolist() == [0, 6, 10]
    assert flat["max_length_q"] == 6
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert flat["labels"][0, 0] == IGNORE_INDEX and flat["labels"][0, 6] == IGNORE_INDEX
    assert flat["seq_idx"].tolist() == [[0] * 6 + [1] * 4] and flat["seq_idx"].dtype == np.int32


def test_flatten_equals_transformers_data_collator_with_flattening():
    transformers = pytest.importorskip("transformers")
    tokens = np.arange(1, 30, dtype=np.int64)
    offsets = np.array([0, 5, 12, 20, 29], dtype=np.int64)
    packed = pack_documents(tokens, offsets, 16)
    flat = packed.gather(np.arange(len(packed)), flatten=True)
    # HF flattens the same sequences, in the order the packed blocks hold them.
    batch = packed.gather(np.arange(len(packed)))
    sequences = []
    for row, positions, mask in zip(batch["input_ids"], batch["position_ids"], batch["attention_mask"]):
        starts = list(np.flatnonzero((positions == 0) & (mask == 1))) + [int(mask.sum())]
        sequences += [{"input_ids": row[a:b].tolist()} for a, b in zip(starts[:-1], starts[1:])]
    hf = transformers.DataCollatorWithFlattening(return_tensors="np", return_flash_attn_kwargs=True,
                                                 return_seq_idx=True)(sequences)
    for key in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert np.array_equal(np.asarray(hf[key]), flat[key]), key
    assert hf["max_length_q"] == flat["max_length_q"]


def test_as_array_is_a_zero_copy_view():
    tokens = np.arange(100, dtype=np.uint16)
    blocks = pack_blocks(tokens, np.array([10, 50, 100]), 16)
    view = blocks.as_array()
    assert view.shape == (5, 16) and np.shares_memory(view, tokens)
    assert view[0, 0] == 10
    with pytest.raises(ValueError, match="view"):
        pack_blocks(tokens, np.array([0, 100]), 16, separator=0).as_array()


def test_gather_into_preallocated_out():
    tokens = np.arange(64, dtype=np.uint32)
    blocks = pack_blocks(tokens, [0, 64], 8)
    out = {k: np.full((2, 8), -1, dtype=np.int64) for k in ("input_ids", "labels", "attention_mask")}
    result = blocks.gather([3, 1], out=out)
    assert result["input_ids"] is out["input_ids"]
    assert out["input_ids"].tolist() == [list(range(24, 32)), list(range(8, 16))]
    with pytest.raises(ValueError, match="shape"):
        blocks.gather([0], out={k: np.empty((2, 8), np.int64) for k in out})


# --- group_texts drop-in ------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 50000), max_size=50), max_size=20), block_size=st.integers(1, 32))
def test_group_texts_equals_the_seed_function(docs, block_size):
    batch = {"input_ids": docs, "attention_mask": [[1] * len(d) for d in docs]}
    ours = fastlm.group_texts(batch, block_size)
    seed = seed_group_texts(batch, block_size)
    assert set(ours) == set(seed) == {"input_ids", "attention_mask", "labels"}
    for key in seed:
        assert ours[key].shape == (len(seed[key]), block_size)
        assert ours[key].tolist() == seed[key]
    assert not np.shares_memory(ours["labels"], ours["input_ids"])


def test_group_texts_on_an_arrow_table():
    pa = pytest.importorskip("pyarrow")
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]
    table = pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32())),
                      "attention_mask": pa.array([[1] * len(d) for d in docs], pa.list_(pa.int8()))})
    out = fastlm.group_texts(table.slice(1), block_size=2)  # a sliced table has non-zero list offsets
    seed = seed_group_texts({"input_ids": docs[1:], "attention_mask": [[1] * len(d) for d in docs[1:]]}, 2)
    assert isinstance(out, pa.Table)
    assert out.to_pydict() == seed
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())


def test_group_texts_inside_datasets_map_matches_the_tutorial(gpt2_tok):
    datasets = pytest.importorskip("datasets")
    from tests.data import wikitext_lines

    raw = datasets.Dataset.from_dict({"text": wikitext_lines("valid")[:2500]})
    tokenized = raw.map(lambda b: gpt2_tok(b["text"]), batched=True, remove_columns=["text"])
    seed = tokenized.map(seed_group_texts, batched=True)
    lists = tokenized.map(fastlm.group_texts, batched=True)
    arrow = tokenized.with_format("arrow").map(fastlm.group_texts, batched=True)
    assert seed.num_rows > 100
    for ours in (lists, arrow):
        assert ours.column_names == seed.column_names
        assert ours.features == seed.features
        for key in seed.column_names:
            assert ours.data.column(key).to_pylist() == seed.data.column(key).to_pylist()
    # The array API in seed-exact mode gives the same blocks from a flat token array.
    ids = tokenized["input_ids"]
    tokens = np.array([t for row in ids for t in row], dtype=np.uint16)
    offsets = np.concatenate(([0], np.cumsum([len(r) for r in ids]))).astype(np.int64)
    blocks = pack_blocks(tokens, offsets, 128, group_size=1000)
    assert blocks.gather(np.arange(len(blocks)))["input_ids"].tolist() == seed.data.column("input_ids").to_pylist()


def test_group_texts_chain_and_seed_references_agree():
    batch = {"input_ids": [[1, 2], [3, 4, 5], [6]]}
    assert chain_group_texts(batch, 2) == seed_group_texts(batch, 2)


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_size=0), ValueError, "block_size must be a positive integer"),
        (dict(block_size=-3), ValueError, "block_size must be a positive integer"),
        (dict(block_size=2.5), ValueError, "block_size must be a positive integer"),
        (dict(offsets=[0, 5, 3, 10]), ValueError, "non-decreasing"),
        (dict(offsets=[0, 11]), ValueError, r"must lie in \[0, 10\]"),
        (dict(offsets=[-1, 10]), ValueError, "must lie in"),
        (dict(offsets=[0.0, 10.0]), TypeError, "offsets must be integers"),
        (dict(tokens=np.arange(10, dtype=np.float32)), TypeError, "dtype float32 is not supported"),
        (dict(tokens=np.arange(10, dtype=np.int8)), TypeError, "dtype int8 is not supported"),
        (dict(tokens=np.arange(20, dtype=np.int32)[::2]), ValueError, "contiguous"),
        (dict(tokens=np.arange(10, dtype=np.int32).reshape(2, 5)), ValueError, "1-D"),
        (dict(tokens=list(range(10))), TypeError, "numpy array"),
        (dict(remainder="pad"), ValueError, "needs a pad_id"),
        (dict(remainder="wrap"), ValueError, "remainder must be one of"),
        (dict(stride=8), ValueError, "must not exceed block_size"),
        (dict(stride=0), ValueError, "stride must be a positive integer"),
        (dict(separator=-1), ValueError, "separator must be a non-negative token id"),
        (dict(group_size=0), ValueError, "group_size must be a positive integer"),
        (dict(group_size=2, stride=2), ValueError, "cannot be combined"),
        # Past int64 the kernels' arguments overflowed (OverflowError) or, for ids, failed later in gather.
        (dict(block_size=2**63), ValueError, r"block_size must be below 2\*\*63"),
        (dict(stride=2**63), ValueError, r"stride must be below 2\*\*63"),
        (dict(group_size=2**63), ValueError, r"group_size must be below 2\*\*63"),
        (dict(separator=2**63), ValueError, r"separator must be below 2\*\*63"),
        (dict(pad_id=2**63, remainder="pad"), ValueError, r"pad_id must be below 2\*\*63"),
        (dict(pad_id=np.uint64(2**64 - 1), remainder="pad"), ValueError, r"pad_id must be below 2\*\*63"),
        (dict(offsets=[0, 2**63]), ValueError, "beyond 2\\*\\*63"),
        (dict(offsets=[0, 2**64]), ValueError, "beyond 2\\*\\*63"),
        (dict(offsets=np.array([0, 2**64 - 1], dtype=np.uint64)), ValueError, "must lie in"),
        (dict(offsets=[]), ValueError, "at least one"),
    ],
)
def test_pack_blocks_rejects_bad_input(kwargs, error, match):
    args = dict(tokens=np.arange(10, dtype=np.int32), offsets=[0, 4, 10], block_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pack_blocks(args.pop("tokens"), args.pop("offsets"), args.pop("block_size"), **args)


def test_pack_documents_rejects_bad_input():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="overlong must be one of"):
        pack_documents(tokens, [0, 10], 4, overlong="drop")
    with pytest.raises(ValueError, match="pad_id"):
        pack_documents(tokens, [0, 10], 4, pad_id=-1)
    with pytest.raises(ValueError, match=r"pad_id must be below 2\*\*63"):
        pack_documents(tokens, [0, 10], 4, pad_id=2**63)
    with pytest.raises(ValueError, match=r"block_size must be below 2\*\*63"):
        pack_documents(tokens, [0, 10], 2**63)
    with pytest.raises(ValueError, match="non-decreasing"):
        pack_documents(tokens, [0, 6, 2, 10], 4)


def test_short_blocks_need_a_pad_id_to_gather():
    blocks = pack_blocks(np.arange(10, dtype=np.int32), [0, 10], 4, remainder="keep")
    with pytest.raises(ValueError, match="pass pad_id"):
        blocks.gather([2])
    with pytest.raises(IndexError, match="out of range"):
        blocks.gather([3])


@pytest.mark.parametrize("result", ["blocks", "packed"])
def test_gather_indices_are_checked_at_the_boundary(result):
    tokens = np.arange(10, dtype=np.int32)
    layout = pack_blocks(tokens, [0, 10], 4) if result == "blocks" else pack_documents(tokens, [0, 4, 10], 4)
    empty = layout.gather([])  # numpy makes [] a float64 array: this was a TypeError
    assert all(array.shape == (0, 4) and array.dtype == np.int64 for array in empty.values())
    # Out of range is an IndexError, as for any sequence, and a ValueError, as for any other bad argument.
    for bad in ([-1], [len(layout)], [2**63], [2**64], np.array([2**64 - 1], dtype=np.uint64)):
        with pytest.raises(IndexError, match="out of range"):
            layout.gather(bad)
        with pytest.raises(ValueError, match="out of range"):
            layout.gather(bad)
    for bad in ([0.0], [True], [[0]], ["0"]):
        with pytest.raises(TypeError, match="indices must be a 1-D array of integers"):
            layout.gather(bad)


def test_group_texts_rejects_bad_batches():
    with pytest.raises(KeyError, match="input_ids"):
        fastlm.group_texts({"attention_mask": [[1, 1]]}, 2)
    with pytest.raises(ValueError, match="row 0 holds 1 ids but its input_ids row holds 2"):
        fastlm.group_texts({"input_ids": [[1, 2]], "attention_mask": [[1]]}, 2)
    with pytest.raises(TypeError, match="str"):
        fastlm.group_texts({"input_ids": ["some text"]}, 2)
    with pytest.raises(ValueError, match="block_size"):
        fastlm.group_texts({"input_ids": [[1, 2]]}, 0)
    with pytest.raises(ValueError, match=r"block_size must be below 2\*\*60"):
        fastlm.group_texts({"input_ids": [[1, 2]]}, 2**62)


@pytest.mark.parametrize(
    "batch, error, match",
    [
        # A float array was truncated into int labels while input_ids kept the floats.
        ({"input_ids": np.array([[1.5, 2.7], [3.2, 4.9]])}, TypeError, "dtype float64; token ids must be integers"),
        ({"input_ids": [[1, 2.5]]}, TypeError, r"'input_ids' row 0, position 1 is a float"),
        ({"input_ids": [[1, 2], [3, None]]}, ValueError, r"'input_ids' row 1, position 1 is None \(a missing id\)"),
        ({"input_ids": [[1, 2], None]}, ValueError, r"'input_ids' row 1 is None \(a missing row\)"),
        ({"input_ids": [[1, 2**63]]}, ValueError, "does not fit in int64"),
        ({"input_ids": np.array([[1, 2**63]], dtype=np.uint64)}, ValueError, "beyond int64"),
        ({"input_ids": np.arange(4)}, TypeError, "2-D"),
        # Equal totals, rows of other lengths: every token after row 0 was paired with the wrong id.
        ({"input_ids": [[1, 2], [3]], "attention_mask": [[1], [1, 1]]}, ValueError,
         "'attention_mask' row 0 holds 1 ids but its input_ids row holds 2"),
    ],
)
def test_group_texts_refuses_what_it_would_coerce(batch, error, match):
    with pytest.raises(error, match=match):
        fastlm.group_texts(batch, 2)


def test_group_texts_refuses_arrow_nulls_and_floats():
    pa = pytest.importorskip("pyarrow")
    with pytest.raises(ValueError, match="'input_ids' row 1 holds a null id"):
        fastlm.group_texts(pa.table({"input_ids": pa.array([[1, 2], [3, None, 5]])}), 2)
    # Null rows at different rows of two columns: flattened, both columns had 4 tokens, mispaired.
    misaligned = pa.table({"input_ids": pa.array([[1, 2], None, [3, 4]]),
                           "attention_mask": pa.array([None, [1, 1], [1, 1]])})
    with pytest.raises(ValueError, match="'input_ids' row 1 is null"):
        fastlm.group_texts(misaligned, 2)
    with pytest.raises(TypeError, match="'input_ids' holds double ids"):
        fastlm.group_texts(pa.table({"input_ids": pa.array([[1.5, 2.5]])}), 2)


def test_group_texts_under_datasets_map_refuses_nulls():
    """datasets hands group_texts its Arrow batch: nulls became NaN input_ids and INT64_MIN labels."""
    datasets = pytest.importorskip("datasets")
    raw = datasets.Dataset.from_dict({"input_ids": [[1, None, 3, 4], [5, 6]]})
    for dataset in (raw, raw.with_format("arrow")):
        with pytest.raises(ValueError, match="'input_ids' row 0 holds a null id"):
            dataset.map(fastlm.group_texts, batched=True, fn_kwargs={"block_size": 2})


def test_pack_documents_work_memory_does_not_grow_with_block_size():
    """Best fit tracks capacities up to the longest piece, not block_size: three short documents in a
    2**31 + 5 block pack under a 1 GiB address-space limit (its capacity tables wanted 40 GB: OOM-killed)."""
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "import numpy as np\n"
        "from fastlm.packing import pack_documents\n"
        "packed = pack_documents(np.arange(100), [0, 10, 40, 100], 2**31 + 5)\n"
        "print(len(packed), sorted(packed.seg_lengths.tolist()))\n"
    )
    # One BLAS thread: each extra one reserves address space of its own.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(maxsplit=1) == ["1", "[10, 30, 60]\n"]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), max_size=25), extra=st.integers(0, 2**40))
def test_pack_documents_with_blocks_far_longer_than_documents(lengths, extra):
    """The capacity tables stop at the longest piece; blocks with more room than that still pack exactly."""
    tokens = np.arange(sum(lengths), dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    block_size = max(lengths, default=1) + extra
    packed = pack_documents(tokens, offsets, block_size)
    assert len(packed) == ref_best_fit_decreasing(lengths, block_size)
    found = [tokens[a:a + n].tolist() for a, n in zip(packed.seg_starts, packed.seg_lengths)]
    assert sorted(found) == sorted(documents(tokens, offsets))


# --- beyond 2**32 ---------------------------------------------------------------------------------------

def test_offsets_beyond_4_billion_tokens(tmp_path):
    """int64 offsets all the way: a sparse 8.6 GB memmap whose last documents sit past 2**32 tokens."""
    n = 2**32 + 64
    path = tmp_path / "tokens.bin"
    tail = np.arange(1, 65, dtype=np.uint16)
    with open(path, "wb") as f:
        f.seek((n - 64) * 2)
        f.write(tail.tobytes())
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))
    offsets = np.array([0, n - 64, n - 20, n], dtype=np.int64)

    blocks = pack_blocks(tokens, offsets, 2**20, remainder="keep", separator=0, pad_id=0, group_size=1)
    last_two = blocks.gather([len(blocks) - 2, len(blocks) - 1])
    assert last_two["input_ids"][0, :45].tolist() == tail[:44].tolist() + [0]
    assert last_two["input_ids"][1, :21].tolist() == tail[44:].tolist() + [0]
    assert last_two["attention_mask"][1].sum() == 21

    packed = pack_documents(tokens, offsets, 64, overlong="truncate")
    batch = packed.gather(np.arange(len(packed)))
    assert len(packed) == 2  # the truncated giant alone; the two small documents share a block
    row = int(np.argmax(batch["input_ids"][:, 0]))
    assert batch["input_ids"][row].tolist() == tail.tolist()
    assert batch["position_ids"][row, 44] == 0
    assert packed.n_dropped == (n - 64) - 64


def test_hand_built_results_are_checked_before_reaching_the_kernels():
    """gather() runs without bounds checks, so a result built or edited by hand is refused up front."""
    from dataclasses import replace

    tokens = np.arange(20, dtype=np.uint16)
    blocks = pack_blocks(tokens, [0, 10, 20], 4)
    with pytest.raises(ValueError, match="out of bounds"):
        replace(blocks, starts=blocks.starts + 100)
    with pytest.raises(ValueError, match="out of bounds"):
        replace(blocks, lengths=blocks.lengths + 1)
    with pytest.raises(TypeError, match="int64"):
        replace(blocks, starts=blocks.starts.astype(np.int32))
    with pytest.raises(ValueError, match="entries"):
        replace(blocks, context=np.zeros(1, np.int64))

    packed = pack_documents(tokens, [0, 10, 20], 8)
    with pytest.raises(ValueError, match="inside tokens"):
        replace(packed, seg_starts=packed.seg_starts + 15)
    with pytest.raises(ValueError, match="more than block_size"):
        replace(packed, block_size=2)
    with pytest.raises(ValueError, match="block_offsets"):
        replace(packed, block_offsets=packed.block_offsets[::-1].copy())


@pytest.mark.parametrize("pack", [
    lambda t, o: pack_blocks(t, o, 2**40, remainder="keep", pad_id=0),
    lambda t, o: pack_blocks(t, o, 2**40, break_mode="eos", pad_id=0),
    lambda t, o: pack_documents(t, o, 2**40),
])
def test_a_batch_larger_than_memory_is_refused_before_allocating(pack):
    """Issue 18 row 8: one short block padded to 2**40 tokens is 8 TiB per array; refused in one line
    (numpy's MemoryError named no argument)."""
    tokens, offsets = np.arange(10, dtype=np.int32), np.array([0, 4, 10])
    refusal = r"gathering 1 block\(s\) of block_size 1099511627776 needs \d+\.\d GiB of int64 rows, more than"
    with pytest.raises(ValueError, match=refusal):
        pack(tokens, offsets).gather([0])
