"""Corpus to training blocks: `fastlm prepare` + pack_blocks vs the tutorial's datasets.map pipeline.

Data: WikiText-2 valid + test raw (../shared/data), GPT-2 tokenizer, repeated 8x (about 4.3 M
tokens); both sides use 2 processes. The tutorial side starts from an in-memory Dataset of the rows
(built outside the timing) and runs `.map(tokenize, batched=True, num_proc=2)` then HF's
itertools.chain `group_texts` with num_proc=2. The fastlm side starts from the raw text file and ends
with a token store on disk plus the block index over its memmap.

Peak RSS of prepare is measured in a child process at 8x and 32x the corpus (extra_info): it must
stay flat. Under `--benchmark-disable` (make test) the corpus is 1x/2x and each side runs once.

    make bench     # or: .venv/bin/python -m pytest benchmarks/bench_prepare.py --benchmark-only
"""
import itertools
import lzma
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import fastlm
from tests.data import shared_path, wikitext_lines
from tests.reference import chain_group_texts

BLOCK = 128
NUM_PROC = 2
ROOT = Path(__file__).resolve().parents[1]

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the (large) pytest
# process would report the parent's size. VmHWM is the peak of the child's own address space.
PEAK_RSS = """
import re, sys
from fastlm.prepare import prepare
prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], num_proc=int(sys.argv[4]), progress=False)
with open("/proc/self/status") as f:
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024)
"""


def _smoke(request):
    return request.config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def scales(request):
    return (1, 2) if _smoke(request) else (8, 32)


@pytest.fixture(scope="module")
def corpus(scales, tmp_path_factory):
    """Raw text files at each scale, and the tutorial's rows at the first scale."""
    raw = "".join(
        lzma.open(shared_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8").read()
        for split in ("valid", "test")
    )
    root = tmp_path_factory.mktemp("bench_prepare")
    files = {}
    for scale in scales:
        files[scale] = root / f"wikitext_x{scale}.txt"
        with open(files[scale], "w", encoding="utf-8") as f:
            for _ in range(scale):
                f.write(raw)
    rows = (wikitext_lines("valid") + wikitext_lines("test")) * scales[0]
    return dict(root=root, files=files, rows=rows, scale=scales[0])


@pytest.fixture(scope="module")
def n_tokens(corpus, gpt2_tok):
    return sum(map(len, gpt2_tok(corpus["rows"])["input_ids"]))


def _cpu_seconds():
    # Children count once reaped: datasets.map's worker pool is joined before map returns.
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _timed(benchmark, request, fn):
    """benchmark.pedantic(fn), also recording CPU seconds per round: on a shared machine wall time
    depends on the neighbours' load, CPU time much less."""
    rounds = 1 if _smoke(request) else 3
    start = _cpu_seconds()
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    benchmark.extra_info["cpu_s_per_round"] = round((_cpu_seconds() - start) / rounds, 2)
    return result


def _throughput(benchmark, n_tokens):
    benchmark.extra_info["tokens"] = n_tokens
    if benchmark.stats:
        benchmark.extra_info["Mtokens_per_s"] = round(n_tokens / benchmark.stats.stats.median / 1e6, 3)


def _peak_rss_mb(source, output):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(source), str(output), str(shared_path("tokenizers", "gpt2")), str(NUM_PROC)],
        env=env, capture_output=True, text=True, check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="corpus -> 128-token blocks")
def bench_prepare_and_pack_fastlm(benchmark, request, corpus, gpt2_tok, n_tokens, scales):
    outputs = (corpus["root"] / f"store_{i}" for i in itertools.count())

    def prepare_and_pack():
        store = fastlm.prepare(
            [corpus["files"][corpus["scale"]]], next(outputs), tokenizer=gpt2_tok, num_proc=NUM_PROC, progress=False
        )
        return store, fastlm.pack_blocks(store.tokens, store.offsets, BLOCK)

    store, blocks = _timed(benchmark, request, prepare_and_pack)
    # Same token stream as the tutorial: same number of tokens and of full blocks (up to the
    # tutorial's per-1000-row remainders, which pack_blocks does not drop).
    assert store.n_tokens == n_tokens
    assert len(blocks) == n_tokens // BLOCK
    _throughput(benchmark, n_tokens)

    rss = {scale: _peak_rss_mb(corpus["files"][scale], corpus["root"] / f"rss_x{scale}") for scale in scales}
    for scale, peak in rss.items():
        benchmark.extra_info[f"peak_rss_mib_x{scale}"] = round(peak, 1)
    small, large = scales
    # 4x the corpus must not mean more memory: allow only measurement noise.
    assert rss[large] < 1.1 * rss[small] + 20, rss


@pytest.mark.benchmark(group="corpus -> 128-token blocks")
def bench_tutorial_map_tokenize_group_texts(benchmark, request, corpus, gpt2_tok, n_tokens):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    raw = datasets.Dataset.from_dict({"text": corpus["rows"]})

    def tokenize(examples):
        return gpt2_tok(examples["text"])

    def tokenize_and_group():
        tokenized = raw.map(tokenize, batched=True, num_proc=NUM_PROC, remove_columns=["text"], load_from_cache_file=False)
        return tokenized.map(chain_group_texts, batched=True, num_proc=NUM_PROC, load_from_cache_file=False)

    blocks = _timed(benchmark, request, tokenize_and_group)
    # The tutorial drops each 1000-row batch's remainder, so it keeps slightly fewer blocks.
    assert 0.99 * (n_tokens // BLOCK) <= len(blocks) <= n_tokens // BLOCK
    _throughput(benchmark, n_tokens)
