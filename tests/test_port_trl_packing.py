"""TRL's ``pack_dataset(strategy="bfd" | "bfd_split")`` tests (trl tests/test_data_utils.py,
TestPackDatasetBfd), rewritten for :func:`fastlm.pack_documents`.

TRL packs a ``datasets.Dataset``; fastlm packs flat token arrays plus offsets, so each test builds those
from TRL's rows and reads TRL's packed rows back out of ``gather``: a block's real tokens (attention 1) are
TRL's row, the runs of ``position_ids`` restarting at 0 its ``seq_lengths``. ``strategy="bfd"`` is
``overlong="truncate"``, ``"bfd_split"`` is ``overlong="split"``.

Of TRL's 7 bfd tests, 4 pass with TRL's exact expectations, 2 are adapted and 1 does not apply:
- adapted (docs/packing.md): within a block fastlm keeps documents in input order, TRL in the order it
  placed them (longest first), so those tests compare each block's documents as a multiset.
- adapted: TRL packs float32 columns as they come; fastlm refuses float token arrays (a float id is a
  truncation waiting to happen), so that test packs int64 and checks that float32 is refused.
- not applicable: ``test_with_iterable_dataset`` repeats ``test_with_dataset`` through datasets'
  IterableDataset; the fastlm port runs the same case on a read-only memmap instead.
"""
import numpy as np
import pytest

from fastlm import pack_documents


def flat(rows, dtype=np.int64):
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    return np.array([t for row in rows for t in row], dtype=dtype), offsets


def packed_rows(rows, seq_length, overlong, other_columns=None, tokens=None):
    """TRL's output dict ({column: packed rows, "seq_lengths": ...}) computed with fastlm."""
    flat_tokens, offsets = flat(rows)
    columns = {name: flat(column)[0] for name, column in (other_columns or {}).items()}
    packed = pack_documents(flat_tokens if tokens is None else tokens, offsets, seq_length, overlong=overlong,
                            columns=columns or None)
    batch = packed.gather(np.arange(len(packed)))
    out = {"input_ids": [], "seq_lengths": [], **{name: [] for name in columns}}
    for b in range(len(packed)):
        real = batch["attention_mask"][b] == 1
        for name in ("input_ids", *columns):
            out[name].append(batch[name][b][real].tolist())
        starts = np.flatnonzero(batch["position_ids"][b][real] == 0)
        out["seq_lengths"].append(np.diff(np.append(starts, real.sum())).tolist())
    return out


def documents_per_block(out, column="input_ids"):
    """Each block's documents as a sorted list: the packing, whatever the order inside a block."""
    blocks = []
    for row, lengths in zip(out[column], out["seq_lengths"]):
        ends = np.cumsum(lengths)
        blocks.append(sorted(row[end - n:end] for end, n in zip(ends, lengths)))
    return blocks


def test_with_dataset():
    # Adapted: TRL's dataset has a float32 numpy format; fastlm takes integer ids only.
    rows = [[1, 2, 3], [4, 5, 6, 7], [8]]
    assert packed_rows(rows, 4, "truncate") == {"input_ids": [[4, 5, 6, 7], [1, 2, 3, 8]],
                                                 "seq_lengths": [[4], [3, 1]]}
    tokens, offsets = flat(rows, dtype=np.float32)
    with pytest.raises(TypeError, match="tokens dtype float32 is not supported"):
        pack_documents(tokens, offsets, 4, overlong="truncate")


def test_with_read_only_memmap(tmp_path):
    # In place of TRL's test_with_iterable_dataset: the same packing from another container.
    rows = [[1, 2, 3], [4, 5, 6, 7], [8]]
    tokens, _ = flat(rows)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    memmap = np.memmap(path, dtype=np.int64, mode="r")
    assert packed_rows(rows, 4, "truncate", tokens=memmap) == {"input_ids": [[4, 5, 6, 7], [1, 2, 3, 8]],
                                                                "seq_lengths": [[4], [3, 1]]}


def test_with_overlong_0():
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    out = packed_rows(rows, 4, "split")
    # TRL: [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7, 5, 12]], seq_lengths [[4], [4], [2, 1, 1]]. Adapted: the
    # same documents in the same blocks, fastlm's third block in input order ([5], [6, 7], [12]).
    assert documents_per_block(out) == [[[1, 2, 3, 4]], [[8, 9, 10, 11]], [[5], [6, 7], [12]]]
    assert out["input_ids"][2] == [5, 6, 7, 12] and out["seq_lengths"][2] == [1, 2, 1]


def test_with_overlong_two_columns():
    col1 = [[1, -2, 3, -4, 5, -6], [7, -8, 9], [-10, 11, -12], [13, -14, 15, -16]]
    col2 = [[-1, 2, -3, 4, -5, 6], [-7, 8, -9], [10, -11, 12], [-13, 14, -15, 16]]
    # TRL's first column is fastlm's tokens (negative ids are fine for the packer; no model would take them).
    out = packed_rows(col1, 4, "split", {"col2": col2})
    assert out == {
        "input_ids": [[1, -2, 3, -4], [13, -14, 15, -16], [7, -8, 9], [-10, 11, -12], [5, -6]],
        "col2": [[-1, 2, -3, 4], [-13, 14, -15, 16], [-7, 8, -9], [10, -11, 12], [-5, 6]],
        "seq_lengths": [[4], [4], [3], [3], [2]],
    }


def test_with_non_power_of_2():
    out = packed_rows([[1, 2, 3, 4, 5], [6], [7, 8, 9, 10], [11, 12, 13]], 5, "split")
    # TRL: [[1, 2, 3, 4, 5], [7, 8, 9, 10, 6], [11, 12, 13]], seq_lengths [[5], [4, 1], [3]]. Adapted as
    # test_with_overlong_0: the second block holds [6] then [7, 8, 9, 10], in input order.
    assert documents_per_block(out) == [[[1, 2, 3, 4, 5]], [[6], [7, 8, 9, 10]], [[11, 12, 13]]]
    assert out["seq_lengths"] == [[5], [1, 4], [3]]


def test_default_no_split():
    out = packed_rows([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], 4, "truncate")
    assert out == {"input_ids": [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7, 12]], "seq_lengths": [[4], [4], [2, 1]]}


def test_with_empty_sequences():
    out = packed_rows([[1, 2], [], [3, 4, 5], [], [6]], 4, "split")
    assert out == {"input_ids": [[3, 4, 5, 6], [1, 2]], "seq_lengths": [[3, 1], [2]]}


# --- beyond TRL's tests: what the other columns get ------------------------------------------------------

def test_given_labels_and_attention_mask_columns_are_packed_like_the_tokens():
    rows = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    tokens, offsets = flat(rows)
    labels, _ = flat([[-100, 12, 13], [21, 22], [-100, -100, 33, 34]])
    attention, _ = flat([[0, 1, 1], [1, 1], [1, 1, 1, 1]])
    packed = pack_documents(tokens, offsets, 6, columns={"labels": labels, "attention_mask": attention.astype(np.int8)})
    batch = packed.gather([0, 1])
    # Blocks: [31..34] alone would leave 2 free: [21, 22] joins it; [11, 12, 13] gets the second block.
    assert batch["input_ids"].tolist() == [[21, 22, 31, 32, 33, 34], [11, 12, 13, 0, 0, 0]]
    # Given labels, with each document's first label -100 (it would be predicted across the boundary)
    # and -100 on padding; given attention_mask values as they were, 0 on padding.
    assert batch["labels"].tolist() == [[-100, 22, -100, -100, 33, 34], [-100, 12, 13, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]]
    flat_batch = packed.gather([0, 1], flatten=True)
    # Flattening drops the padding (by the packer's own mask), not the tokens a given mask zeroes.
    assert flat_batch["input_ids"].tolist() == [[21, 22, 31, 32, 33, 34, 11, 12, 13]]
    assert flat_batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 1, 1]]
    assert flat_batch["labels"].tolist() == [[-100, 22, -100, -100, 33, 34, -100, 12, 13]]


def test_bad_columns_are_refused():
    tokens, offsets = flat([[1, 2], [3]])
    with pytest.raises(ValueError, match="'mask' has 2 entries, tokens 3: they must align"):
        pack_documents(tokens, offsets, 4, columns={"mask": np.ones(2, dtype=np.int64)})
    with pytest.raises(TypeError, match="'weights' must be a 1-D integer or boolean numpy array"):
        pack_documents(tokens, offsets, 4, columns={"weights": np.ones(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="'input_ids' is derived from tokens"):
        pack_documents(tokens, offsets, 4, columns={"input_ids": tokens})
    with pytest.raises(TypeError, match="columns must be a dict"):
        pack_documents(tokens, offsets, 4, columns=[tokens])
