"""Packing benchmarks: fastlm vs the tutorial's group_texts, HF's chain version, numpy, and TRL's bfd.

Data: WikiText-2 valid + test (tests/fixtures), GPT-2 tokenizer, rows repeated 8x (about 4.3 M tokens).
Under `--benchmark-disable` (make test) the corpus is not repeated, so the smoke run stays quick.

    make bench     # or: .venv/bin/python -m pytest benchmarks/bench_packing.py --benchmark-only
"""
import numpy as np
import pytest

import fastlm
from tests.data import wikitext_lines
from tests.reference import chain_group_texts, seed_group_texts

BLOCK = 128
MAP_BATCH = 1000  # datasets.map's default batch_size: the tutorial drops the remainder of each
# One group: the seed's group_texts (slow, timed once) is the baseline for the dict-of-lists and the
# array rows alike.
BLOCKS_GROUP = "corpus -> 128-token blocks (dict-of-lists batches and flat arrays)"


@pytest.fixture(scope="module")
def corpus(request, gpt2_tok):
    repeat = 1 if request.config.getoption("benchmark_disable") else 8
    lines = wikitext_lines("valid") + wikitext_lines("test")
    encoded = gpt2_tok(lines)
    rows = {"input_ids": encoded["input_ids"] * repeat, "attention_mask": encoded["attention_mask"] * repeat}
    lengths = np.array([len(r) for r in rows["input_ids"]], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    tokens = np.fromiter((t for r in rows["input_ids"] for t in r), dtype=np.uint16, count=int(offsets[-1]))
    batches = [{k: v[i:i + MAP_BATCH] for k, v in rows.items()} for i in range(0, len(lengths), MAP_BATCH)]
    return dict(rows=rows, batches=batches, tokens=tokens, offsets=offsets, n_tokens=int(offsets[-1]))


@pytest.fixture(scope="module")
def tokenized_dataset(corpus):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(corpus["rows"])


def _throughput(benchmark, n_tokens):
    benchmark.extra_info["tokens"] = n_tokens
    if benchmark.stats:
        benchmark.extra_info["Mtokens_per_s"] = round(n_tokens / benchmark.stats.stats.median / 1e6, 2)


# --- group_texts called on dict-of-lists batches --------------------------------------------------------

def _over_batches(fn, batches):
    return [fn(batch, BLOCK) for batch in batches]


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_group_texts_seed_sum(benchmark, corpus):
    benchmark.pedantic(_over_batches, (seed_group_texts, corpus["batches"]), rounds=1, iterations=1)
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_group_texts_hf_chain(benchmark, corpus):
    benchmark(_over_batches, chain_group_texts, corpus["batches"])
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_group_texts_fastlm(benchmark, corpus):
    out = benchmark(_over_batches, fastlm.group_texts, corpus["batches"])
    assert out[0]["input_ids"].tolist() == chain_group_texts(corpus["batches"][0], BLOCK)["input_ids"]
    _throughput(benchmark, corpus["n_tokens"])


# --- inside datasets.map ------------------------------------------------------------------------------

@pytest.mark.benchmark(group="datasets.map(group_texts)")
def bench_map_hf_chain(benchmark, tokenized_dataset, corpus):
    benchmark.pedantic(lambda: tokenized_dataset.map(chain_group_texts, batched=True), rounds=3, iterations=1)
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group="datasets.map(group_texts)")
def bench_map_fastlm_lists(benchmark, tokenized_dataset, corpus):
    benchmark.pedantic(lambda: tokenized_dataset.map(fastlm.group_texts, batched=True), rounds=5, iterations=1)
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group="datasets.map(group_texts)")
def bench_map_fastlm_arrow(benchmark, tokenized_dataset, corpus):
    arrow = tokenized_dataset.with_format("arrow")
    benchmark.pedantic(lambda: arrow.map(fastlm.group_texts, batched=True), rounds=5, iterations=1)
    _throughput(benchmark, corpus["n_tokens"])


# --- the array API over a flat token array (a store's memmap) ------------------------------------------

def _pack_and_gather(tokens, offsets, out):
    blocks = fastlm.pack_blocks(tokens, offsets, BLOCK, group_size=MAP_BATCH)
    return blocks.gather(np.arange(len(blocks)), out=out)


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_array_numpy_concatenate_reshape(benchmark, corpus):
    docs = np.split(corpus["tokens"], corpus["offsets"][1:-1])

    def concatenate_reshape():
        flat = np.concatenate(docs).astype(np.int64)
        n = flat.shape[0] // BLOCK
        return flat[: n * BLOCK].reshape(n, BLOCK)

    benchmark(concatenate_reshape)
    _throughput(benchmark, corpus["n_tokens"])


@pytest.fixture(scope="module")
def token_memmap(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "tokens.bin"
    corpus["tokens"].tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_array_fastlm_pack_blocks_and_gather(benchmark, corpus, token_memmap):
    """Index + every block materialised as int64 input_ids, labels, attention_mask (preallocated, as the
    runner's loader does per batch; fresh allocations would add ~8 ms of page faults per call)."""
    n_blocks = len(fastlm.pack_blocks(token_memmap, corpus["offsets"], BLOCK, group_size=MAP_BATCH))
    out = {key: np.empty((n_blocks, BLOCK), np.int64) for key in ("input_ids", "labels", "attention_mask")}
    batch = benchmark(_pack_and_gather, token_memmap, corpus["offsets"], out)
    expected = [b for out in _over_batches(chain_group_texts, corpus["batches"][:2]) for b in out["input_ids"]]
    assert batch["input_ids"][: len(expected)].tolist() == expected
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_array_fastlm_pack_blocks_index_only(benchmark, corpus, token_memmap):
    """What the runner actually builds up front: the block index over the memmap (batches come later)."""
    blocks = benchmark(fastlm.pack_blocks, token_memmap, corpus["offsets"], BLOCK, group_size=MAP_BATCH)
    assert len(blocks) == sum(len(out["input_ids"]) for out in _over_batches(fastlm.group_texts, corpus["batches"]))
    _throughput(benchmark, corpus["n_tokens"])


# --- document packing vs TRL ------------------------------------------------------------------------------

PACK = 512


@pytest.mark.benchmark(group="document packing (bfd, block 512)")
def bench_docs_trl_bfd(benchmark, tokenized_dataset, corpus):
    trl = pytest.importorskip("trl")
    packed = benchmark.pedantic(
        lambda: trl.pack_dataset(tokenized_dataset, PACK, strategy="bfd"), rounds=1, iterations=1
    )
    n_real = sum(len(r) for r in packed["input_ids"])
    benchmark.extra_info["fill_rate"] = round(n_real / (packed.num_rows * PACK), 4)
    benchmark.extra_info["blocks"] = packed.num_rows
    _throughput(benchmark, corpus["n_tokens"])


@pytest.mark.benchmark(group="document packing (bfd, block 512)")
def bench_docs_fastlm_pack_documents(benchmark, corpus):
    packed = benchmark(fastlm.pack_documents, corpus["tokens"], corpus["offsets"], PACK, overlong="truncate")
    benchmark.extra_info["fill_rate"] = round(packed.fill_rate, 4)
    benchmark.extra_info["blocks"] = len(packed)
    _throughput(benchmark, corpus["n_tokens"])
