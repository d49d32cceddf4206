"""Opening a Megatron-LM indexed dataset in place: the time must not grow with the token count.

Two datasets of the same 100,000 documents, one of 4 M tokens (40 per document) and one of 400 M tokens
(4,000 per document), as sparse .bin files (nothing stored, so they are made in a moment and take no
disk). Each is opened by fastlm.TokenStore.open and, side by side, by megatron-core's IndexedDataset,
which also reads only the index. Neither reads the .bin, so both sizes should take the same time;
a scan of the .bin (what computing the largest id costs, done lazily by fastlm) is timed as the contrast.

Writing one: `fastlm export --format megatron` of a store of 100,000 documents (about 25 M tokens) against
megatron-core's IndexedDatasetBuilder fed the same documents one by one (add_document + finalize, as
preprocess_data.py feeds it), both from the same store.

    .venv/bin/python -m pytest benchmarks/bench_megatron.py --benchmark-only
"""
import struct

import numpy as np
import pytest

from fastlm.export import export_store
from fastlm.store import StoreWriter, TokenStore

N_DOCS = 100_000
TOKENS_PER_DOC = {"4M tokens": 40, "400M tokens": 4_000}


def write_sparse_dataset(prefix, n_docs, doc_length):
    """PREFIX.idx for n_docs uint16 documents of doc_length tokens, and a sparse PREFIX.bin of that size."""
    lengths = np.full(n_docs, doc_length, "<i4")
    pointers = np.arange(n_docs, dtype="<i8") * doc_length * 2
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, n_docs, n_docs + 1))  # code 8: uint16
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(n_docs + 1, dtype="<i8").tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(n_docs * doc_length * 2)
    return str(prefix)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return {size: write_sparse_dataset(root / size.split()[0], N_DOCS, per_doc)
            for size, per_doc in TOKENS_PER_DOC.items()}


@pytest.mark.parametrize("size", list(TOKENS_PER_DOC))
@pytest.mark.benchmark(group="open a Megatron dataset of 100,000 documents")
def bench_open_fastlm(benchmark, datasets, size):
    store = benchmark(TokenStore.open, datasets[size])
    assert store.n_tokens == N_DOCS * TOKENS_PER_DOC[size] and len(store) == N_DOCS
    benchmark.extra_info["tokens"] = store.n_tokens


@pytest.mark.parametrize("size", list(TOKENS_PER_DOC))
@pytest.mark.benchmark(group="open a Megatron dataset of 100,000 documents")
def bench_open_megatron_core(benchmark, datasets, size):
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    dataset = benchmark(indexed_dataset.IndexedDataset, datasets[size])
    assert len(dataset) == N_DOCS
    benchmark.extra_info["tokens"] = N_DOCS * TOKENS_PER_DOC[size]


@pytest.mark.parametrize("size", list(TOKENS_PER_DOC))
@pytest.mark.benchmark(group="open a Megatron dataset of 100,000 documents")
def bench_scan_the_bin_for_the_largest_id(benchmark, datasets, size):
    store = TokenStore.open(datasets[size])
    assert benchmark.pedantic(store.token_id_range, rounds=1, iterations=1) == (0, 0)
    benchmark.extra_info["tokens"] = store.n_tokens


@pytest.fixture(scope="module")
def store(tmp_path_factory, request):
    n_docs = 1_000 if request.config.getoption("benchmark_disable") else N_DOCS
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 400, n_docs)
    with StoreWriter(tmp_path_factory.mktemp("store") / "s", vocab_size=50257) as writer:
        writer.append(rng.integers(0, 50257, int(lengths.sum())), lengths)
        return writer.close({})


@pytest.mark.benchmark(group="write a Megatron dataset")
def bench_export_megatron_fastlm(benchmark, store, tmp_path):
    outputs = (tmp_path / f"fastlm{i}" for i in range(1_000_000))

    def export():
        prefix = next(outputs)
        export_store(store, prefix, format="megatron")
        return prefix

    prefix = benchmark.pedantic(export, rounds=3, iterations=1)
    benchmark.extra_info["tokens"] = store.n_tokens
    assert np.array_equal(TokenStore.open(prefix).offsets, store.offsets)


@pytest.mark.benchmark(group="write a Megatron dataset")
def bench_export_megatron_core_builder(benchmark, store, tmp_path):
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    outputs = (tmp_path / f"builder{i}" for i in range(1_000_000))

    def build():
        prefix = next(outputs)
        builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
        for doc in store:
            builder.add_document(doc, [doc.shape[0]])
        builder.finalize(f"{prefix}.idx")
        return prefix

    prefix = benchmark.pedantic(build, rounds=3, iterations=1)
    benchmark.extra_info["tokens"] = store.n_tokens
    assert len(indexed_dataset.IndexedDataset(str(prefix))) == len(store)
