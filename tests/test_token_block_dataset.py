"""fairseq's TokenBlockDataset tests (tests/test_token_block_dataset.py), rewritten for fastlm's break modes.

fairseq takes a dataset of sentences (each ending in eos=1) and returns each block's tokens; here the
sentences are documents (flat tokens + offsets) and a block's tokens are its attended ids. Each test runs
on both index classes: pack_blocks' BlockIndex (contiguous stream slices) and pack_documents'
PackedDocuments (documents isolated by position ids). fairseq's "eos" mode ignores block_size; here
``overlong="keep"`` gives the same blocks, each document whole.
"""
import numpy as np
import pytest

from fastlm.packing import pack_blocks, pack_documents


def flat(sentences, dtype=np.int64):
    tokens = np.array([t for sentence in sentences for t in sentence], dtype=dtype)
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in sentences]))).astype(np.int64)
    return tokens, offsets


def blocks_of(index):
    batch = index.gather(np.arange(len(index)))
    return [row[mask == 1].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


PACKERS = {
    "pack_blocks": lambda tokens, offsets, block_size, **kw: pack_blocks(tokens, offsets, block_size, pad_id=0, **kw),
    "pack_documents": lambda tokens, offsets, block_size, **kw: pack_documents(tokens, offsets, block_size, pad_id=0,
                                                                               **kw),
}


@pytest.fixture(params=sorted(PACKERS))
def pack(request):
    return PACKERS[request.param]


@pytest.mark.parametrize("sentences", [
    [[5, 4, 3, 2, 1], [1], [8, 7, 6, 1]],
    [[5, 4, 3, 2, 1], [8, 7, 6, 1], [1]],
])
def test_eos_break_mode_gives_each_sentence_its_block(pack, sentences):
    tokens, offsets = flat(sentences)
    assert blocks_of(pack(tokens, offsets, 1, break_mode="eos", overlong="keep")) == sentences


def test_none_break_mode_cuts_the_stream_anywhere():
    """fairseq's "none" mode is pack_blocks' default, with the short last block kept."""
    tokens, offsets = flat([[5, 4, 3, 2, 1], [8, 7, 6, 1], [9, 1]])
    assert blocks_of(pack_blocks(tokens, offsets, 3, remainder="keep", pad_id=0)) == [
        [5, 4, 3], [2, 1, 8], [7, 6, 1], [9, 1]]


def test_complete_break_mode_fills_blocks_with_whole_sentences(pack):
    tokens, offsets = flat([[5, 4, 3, 2, 1], [8, 7, 6, 1], [9, 1]])
    assert blocks_of(pack(tokens, offsets, 6, break_mode="complete")) == [[5, 4, 3, 2, 1], [8, 7, 6, 1, 9, 1]]


def test_complete_break_mode_keeps_an_overlong_sentence_whole(pack):
    tokens, offsets = flat([[4, 3, 2, 1], [5, 1], [1], [6, 1]])
    index = pack(tokens, offsets, 3, break_mode="complete", overlong="keep")
    assert blocks_of(index) == [[4, 3, 2, 1], [5, 1, 1], [6, 1]]
    assert index.block_size == 4, "rows are as wide as the sentence kept whole"
    # The other overlong choices keep the rows block_size wide.
    assert blocks_of(pack(tokens, offsets, 3, break_mode="complete")) == [[4, 3, 2], [1, 5, 1], [1, 6, 1]]
    assert blocks_of(pack(tokens, offsets, 3, break_mode="complete", overlong="truncate")) == [
        [4, 3, 2], [5, 1, 1], [6, 1]]


def test_complete_break_mode_past_4_billion_tokens(tmp_path):
    """fairseq's regression test for numpy's uint64 + int promotion to float: 430,000 sentences of 10,000
    tokens (a sparse memmap of 4.3 billion tokens) in complete mode; the last block ends past 2**32 and
    every bound stays an int64."""
    n_sentences, length = 430_000, 10_000
    n = n_sentences * length
    path = tmp_path / "tokens.bin"
    with open(path, "wb") as f:
        f.seek((n - length) * 2)
        f.write(np.arange(length, dtype=np.uint16).tobytes())
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))
    offsets = np.arange(n_sentences + 1, dtype=np.int64) * length

    blocks = pack_blocks(tokens, offsets, 6, break_mode="complete", overlong="keep", pad_id=0)
    assert len(blocks) == n_sentences
    end = blocks.starts[-1] + blocks.lengths[-1]
    assert end == n > 2**32 - 1 and blocks.starts.dtype == np.int64 and isinstance(end + 1, np.integer)
    assert blocks.gather([len(blocks) - 1])["input_ids"][0].tolist() == list(range(length))

    packed = pack_documents(tokens, offsets, 6, break_mode="complete", overlong="keep")
    assert len(packed) == n_sentences and packed.seg_starts[-1] == n - length
    assert packed.gather([len(packed) - 1])["input_ids"][0].tolist() == list(range(length))
