"""Corpus to tokens: `fastlm prepare` against the tutorial pipeline, datatrove and Megatron, and its
encoders against each other.

Data: WikiText-2 valid + test raw (tests/fixtures), GPT-2 tokenizer. Groups:

- corpus -> 128-token blocks (x8, about 4.3 M tokens, 2 workers on every side): fastlm prepare (tiktoken
  path, and --encoder hf) + pack_blocks, from the raw text file to a store and its block index, vs the
  tutorial's `.map(tokenize, batched=True, num_proc=2)` + HF's itertools.chain `group_texts` with
  num_proc=2, from an in-memory Dataset of the rows built outside the timing. Peak RSS of prepare is
  measured in a child process at x8 and x32 (extra_info): it must stay flat.
- encoder, one core (x8 rows in prepare's ~1 MB batches): the tiktoken path vs the HF fast tokenizer's
  `__call__` on the same batches.
- prepare scaling: tokens/s at num_proc 1 and 2 for both encoders (x8 file). Reported against targets
  at the end of the run: the speedup from 1 to 2 worker processes (>= 1.8x), prepare at one process
  as a fraction of the encoder's own tokens/s (>= 80%: what reading, decoding, byte counting and
  writing cost), and what 64 cores would give by Amdahl's law fitted to the 1- and 2-process times.
- the CLI as users run it (x8, 2 workers on both sides, whole processes with their imports):
  `fastlm prepare` (tokenizer files cached from an earlier run, as for any user's second run) +
  pack_blocks vs the tutorial as a script: load_dataset("text"), `.map(tokenize, num_proc=2)`,
  group_texts with num_proc=2. Target >= 5x, reported at the end.
- tokenize a corpus, 2 workers (x2 rows as jsonl in two files): fastlm prepare vs datatrove's
  DocumentTokenizer pipeline vs Megatron's preprocess_data.py loop (megatron-core's tokenizer and
  IndexedDatasetBuilder in a 2-process Pool, as tools/preprocess_data.py does; that script is not in
  the megatron-core package). Skipped when datatrove / megatron-core are not installed.

Under `--benchmark-disable` (make test) the corpus is x1/x2 and each row runs once.

    make bench     # or: .venv/bin/python -m pytest benchmarks/bench_prepare.py --benchmark-only
"""
import itertools
import json
import lzma
import multiprocessing
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastlm
from fastlm.encoding import Batch, TiktokenEncoder, encode_batches
from tests.data import fixture_path, wikitext_lines
from tests.reference import chain_group_texts

BLOCK = 128
NUM_PROC = 2
ROOT = Path(__file__).resolve().parents[1]
BLOCKS_GROUP = "corpus -> 128-token blocks"
ENCODER_GROUP = "encoder, one core, same batches"
SCALING_GROUP = "prepare scaling: 1 vs 2 worker processes"
PEERS_GROUP = "tokenize a jsonl corpus, 2 workers"
CLI_GROUP = "corpus -> 128-token blocks, whole processes with their imports"
# Medians of the benchmarks that the targets compare, by name, filled as the run goes.
_MEDIANS = {}

# The tutorial (run_clm.py's data path) as a script of its own.
TUTORIAL_SCRIPT = """
import sys
from pathlib import Path

import datasets
from transformers import GPT2TokenizerFast

from tests.reference import chain_group_texts

path, tokenizer_dir, num_proc, cache_dir = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
datasets.disable_progress_bars()
tokenizer = GPT2TokenizerFast(vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"))
raw = datasets.load_dataset("text", data_files=path, split="train", cache_dir=cache_dir, keep_linebreaks=True)
tokenized = raw.map(lambda rows: tokenizer(rows["text"]), batched=True, num_proc=num_proc, remove_columns=["text"],
                    load_from_cache_file=False)
blocks = tokenized.map(chain_group_texts, batched=True, num_proc=num_proc, load_from_cache_file=False)
print(len(blocks))
"""

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the (large) pytest
# process would report the parent's size. VmHWM is the peak of the child's own address space. Its
# worker processes (forked, no exec) report their largest peak through RUSAGE_CHILDREN.
PEAK_RSS = """
import re, resource, sys
from fastlm.prepare import prepare
prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], num_proc=int(sys.argv[4]), progress=False)
with open("/proc/self/status") as f:
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
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
        lzma.open(fixture_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8").read()
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


def _cpu_seconds(who=None):
    """CPU seconds of this process and its children (or of ``who``: RUSAGE_SELF or RUSAGE_CHILDREN).
    Children count once reaped: datasets.map's and prepare's worker pools are joined before they return."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, [who] if who is not None else [resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN])
    )


def _timed(benchmark, request, fn, rounds=3):
    """benchmark.pedantic(fn), also recording CPU seconds per round, in all and in child processes: on a
    shared machine wall time depends on the neighbours' load, CPU time much less."""
    rounds = 1 if _smoke(request) else rounds
    start, start_children = _cpu_seconds(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    benchmark.extra_info["cpu_s_per_round"] = round((_cpu_seconds() - start) / rounds, 2)
    benchmark.extra_info["children_cpu_s_per_round"] = round(
        (_cpu_seconds(resource.RUSAGE_CHILDREN) - start_children) / rounds, 2)
    return result


def _throughput(benchmark, n_tokens):
    benchmark.extra_info["tokens"] = n_tokens
    if benchmark.stats:
        benchmark.extra_info["Mtokens_per_s"] = round(n_tokens / benchmark.stats.stats.median / 1e6, 3)
        cpu = benchmark.extra_info.get("cpu_s_per_round")
        if cpu:
            benchmark.extra_info["Mtokens_per_cpu_s"] = round(n_tokens / cpu / 1e6, 3)


def _peak_rss_mb(source, output):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(source), str(output), str(fixture_path("tokenizers", "gpt2")), str(NUM_PROC)],
        env=env, capture_output=True, text=True, check=True,
    )
    parent, worker = result.stdout.strip().splitlines()[-2:]
    return float(parent), float(worker)


def _outputs(corpus, name):
    return (corpus["root"] / f"{name}_{i}" for i in itertools.count())


# --- corpus -> 128-token blocks -------------------------------------------------------------------------


def _prepare_and_pack(benchmark, request, corpus, gpt2_tok, n_tokens, encoder):
    outputs = _outputs(corpus, f"store_{encoder}")

    def prepare_and_pack():
        store = fastlm.prepare([corpus["files"][corpus["scale"]]], next(outputs), tokenizer=gpt2_tok,
                               num_proc=NUM_PROC, encoder=encoder, progress=False)
        return store, fastlm.pack_blocks(store.tokens, store.offsets, BLOCK)

    store, blocks = _timed(benchmark, request, prepare_and_pack)
    # Same token stream as the tutorial: same number of tokens and of full blocks (up to the
    # tutorial's per-1000-row remainders, which pack_blocks does not drop).
    assert store.n_tokens == n_tokens and store.meta["encoding"]["encoder"] == encoder
    assert len(blocks) == n_tokens // BLOCK
    _throughput(benchmark, n_tokens)


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_prepare_and_pack_fastlm(benchmark, request, corpus, gpt2_tok, n_tokens, scales):
    _prepare_and_pack(benchmark, request, corpus, gpt2_tok, n_tokens, "tiktoken")
    rss = {scale: _peak_rss_mb(corpus["files"][scale], corpus["root"] / f"rss_x{scale}") for scale in scales}
    for scale, (parent, worker) in rss.items():
        benchmark.extra_info[f"peak_rss_mib_x{scale}"] = round(parent, 1)
        benchmark.extra_info[f"peak_worker_rss_mib_x{scale}"] = round(worker, 1)
    small, large = scales
    # 4x the corpus must not mean more memory, in the parent or any worker: allow only measurement noise.
    for side in (0, 1):
        assert rss[large][side] < 1.1 * rss[small][side] + 20, rss


@pytest.mark.benchmark(group=BLOCKS_GROUP)
def bench_prepare_and_pack_fastlm_hf_encoder(benchmark, request, corpus, gpt2_tok, n_tokens):
    _prepare_and_pack(benchmark, request, corpus, gpt2_tok, n_tokens, "hf")


@pytest.mark.benchmark(group=BLOCKS_GROUP)
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


# --- the encoders on one core -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(corpus):
    """The x8 rows (blank ones dropped, as prepare does) in ~1 MB batches, as prepare encodes them."""
    rows = [row for row in corpus["rows"] if row]
    sizes = np.cumsum([len(row) for row in rows])
    cuts = np.searchsorted(sizes, np.arange(1 << 20, sizes[-1], 1 << 20))
    return [rows[a:b] for a, b in itertools.pairwise([0, *cuts.tolist(), len(rows)])]


@pytest.mark.benchmark(group=ENCODER_GROUP)
def bench_encoder_tiktoken_path(benchmark, request, gpt2_tok, batches, n_tokens):
    encoder = TiktokenEncoder(gpt2_tok.backend_tokenizer.to_str(), np.uint16)

    def encode_all():
        return sum(tokens.shape[0] for tokens, *_ in encode_batches(map(Batch, batches), encoder))

    assert _timed(benchmark, request, encode_all, rounds=5) == n_tokens
    _throughput(benchmark, n_tokens)
    _keep_median(benchmark, "encoder")


@pytest.mark.benchmark(group=ENCODER_GROUP)
def bench_encoder_hf_fast_tokenizer_call(benchmark, request, gpt2_tok, batches, n_tokens):
    def encode_all():
        return sum(len(ids) for batch in batches for ids in gpt2_tok(batch)["input_ids"])

    assert _timed(benchmark, request, encode_all, rounds=5) == n_tokens
    _throughput(benchmark, n_tokens)


# --- scaling with num_proc --------------------------------------------------------------------------------


@pytest.mark.benchmark(group=SCALING_GROUP)
@pytest.mark.parametrize("encoder, num_proc", [("tiktoken", 1), ("tiktoken", 2), ("hf", 1), ("hf", 2)])
def bench_prepare_num_proc(benchmark, request, corpus, gpt2_tok, n_tokens, encoder, num_proc, report):
    outputs = _outputs(corpus, f"scaling_{encoder}_{num_proc}")

    def run():
        return fastlm.prepare([corpus["files"][corpus["scale"]]], next(outputs), tokenizer=gpt2_tok,
                              num_proc=num_proc, encoder=encoder, progress=False)

    assert _timed(benchmark, request, run).n_tokens == n_tokens
    _throughput(benchmark, n_tokens)
    _keep_median(benchmark, f"prepare {encoder} {num_proc}")
    one, two, encoder_alone = (_MEDIANS.get(f"prepare {encoder} 1"), _MEDIANS.get(f"prepare {encoder} 2"),
                               _MEDIANS.get("encoder"))
    cpu = benchmark.extra_info.get("cpu_s_per_round")
    if cpu:
        _MEDIANS[f"prepare {encoder} {num_proc} cpu"] = cpu
    one_cpu, two_cpu = _MEDIANS.get(f"prepare {encoder} 1 cpu"), _MEDIANS.get(f"prepare {encoder} 2 cpu")
    if num_proc == 2 and one and two:
        report(f"prepare {encoder}: 1 -> 2 worker processes: {one / two:.2f}x (target >= 1.8x)")
        if one_cpu and two_cpu:
            # On a shared machine wall time follows the neighbours; CPU seconds show the workers' overhead.
            report(f"prepare {encoder}: CPU seconds at 1 and 2 processes: {one_cpu:.2f} and {two_cpu:.2f} "
                   f"(2 free cores would give at most {2 * one_cpu / two_cpu:.2f}x)")
            # Amdahl's law from the 2-process run's CPU time: the parent's (set-up, joining the parts) is
            # serial, the workers' divides among the processes.
            workers = benchmark.extra_info["children_cpu_s_per_round"]
            serial = two_cpu - workers
            at_64 = serial + workers / 64
            report(f"prepare {encoder}: model for 64 processes: {serial:.2f} s serial + {workers:.2f} s / processes "
                   f"-> {n_tokens / at_64 / 1e6:.1f} M tokens/s ({one_cpu / at_64:.0f}x one process)")
    if num_proc == 1 and encoder == "tiktoken" and one and encoder_alone:
        report(f"prepare tiktoken at 1 process: {encoder_alone / one:.0%} of the encoder's own tokens/s "
               "(target >= 80%)")


def _keep_median(benchmark, name):
    if benchmark.stats:
        _MEDIANS[name] = benchmark.stats.stats.median


# --- the CLI as users run it --------------------------------------------------------------------------------


@pytest.mark.benchmark(group=CLI_GROUP)
def bench_cli_prepare_whole_process(benchmark, request, corpus, gpt2_tok, n_tokens):
    gpt2_dir = fixture_path("tokenizers", "gpt2")
    outputs = _outputs(corpus, "cli")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}

    def prepare_and_pack():
        out = next(outputs)
        subprocess.run([sys.executable, "-m", "fastlm.cli", "prepare", str(corpus["files"][corpus["scale"]]), "-o",
                        str(out), "--tokenizer", str(gpt2_dir), "--num-proc", str(NUM_PROC), "--no-progress"],
                       env=env, check=True, capture_output=True)
        store = fastlm.TokenStore.open(out)
        return store, fastlm.pack_blocks(store.tokens, store.offsets, BLOCK)

    prepare_and_pack()  # a user's first run with these tokenizer files fills the encoder cache
    store, blocks = _timed(benchmark, request, prepare_and_pack)
    assert store.n_tokens == n_tokens and len(blocks) == n_tokens // BLOCK
    _throughput(benchmark, n_tokens)
    _keep_median(benchmark, "cli")


@pytest.mark.benchmark(group=CLI_GROUP)
def bench_tutorial_script_whole_process(benchmark, request, corpus, n_tokens, report):
    pytest.importorskip("datasets")
    script = corpus["root"] / "tutorial.py"
    script.write_text(TUTORIAL_SCRIPT, encoding="utf-8")
    caches = _outputs(corpus, "tutorial_cache")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}

    def tokenize_and_group():
        result = subprocess.run([sys.executable, str(script), str(corpus["files"][corpus["scale"]]),
                                 str(fixture_path("tokenizers", "gpt2")), str(NUM_PROC), str(next(caches))],
                                env=env, check=True, capture_output=True, text=True)
        return int(result.stdout.split()[-1])

    blocks = _timed(benchmark, request, tokenize_and_group)
    # The text loader keeps WikiText's blank " " lines (prepare skips them) and each 1000-row batch
    # drops its remainder: the block counts differ by about a per cent.
    assert 0.97 * (n_tokens // BLOCK) <= blocks <= 1.03 * (n_tokens // BLOCK)
    _throughput(benchmark, n_tokens)
    _keep_median(benchmark, "tutorial")
    if _MEDIANS.get("cli") and _MEDIANS.get("tutorial"):
        report(f"fastlm prepare (CLI, whole process) vs the tutorial script: {_MEDIANS['tutorial'] / _MEDIANS['cli']:.2f}x "
               "(target >= 5x)")


# --- fastlm prepare vs datatrove and Megatron -------------------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_corpus(request, gpt2_tok, tmp_path_factory):
    """x2 of the rows (non-blank; 300 rows in a smoke run) as jsonl in two files (one per worker), a
    save_pretrained tokenizer directory, and the token count."""
    root = tmp_path_factory.mktemp("peers")
    rows = [row for row in wikitext_lines("valid") + wikitext_lines("test") if row]
    rows = rows[:300] if _smoke(request) else rows * 2
    files = [root / "input" / f"part{i}.jsonl" for i in range(2)]
    files[0].parent.mkdir()
    for file, part in zip(files, (rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        file.write_text("".join(json.dumps({"text": row}) + "\n" for row in part), encoding="utf-8")
    gpt2_tok.save_pretrained(root / "tokenizer")
    n = sum(map(len, gpt2_tok(rows)["input_ids"]))
    return dict(root=root, files=files, rows=rows, tokenizer=root / "tokenizer", n_tokens=n)


@pytest.mark.benchmark(group=PEERS_GROUP)
def bench_tokenize_jsonl_fastlm(benchmark, request, jsonl_corpus, gpt2_tok):
    outputs = _outputs(jsonl_corpus, "fastlm")

    def run():
        return fastlm.prepare(jsonl_corpus["files"], next(outputs), tokenizer=gpt2_tok, num_proc=NUM_PROC, progress=False)

    assert _timed(benchmark, request, run, rounds=1).n_tokens == jsonl_corpus["n_tokens"]
    _throughput(benchmark, jsonl_corpus["n_tokens"])


@pytest.mark.benchmark(group=PEERS_GROUP)
def bench_tokenize_jsonl_datatrove(benchmark, request, jsonl_corpus):
    pytest.importorskip("datatrove")
    pytest.importorskip("orjson")  # datatrove's JsonlReader needs it
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    outputs = _outputs(jsonl_corpus, "datatrove")

    def run():
        out = next(outputs)
        pipeline = [
            JsonlReader(str(jsonl_corpus["files"][0].parent)),
            DocumentTokenizer(str(out), tokenizer_name_or_path=str(jsonl_corpus["tokenizer"] / "tokenizer.json"),
                              eos_token=None, shuffle_documents=False),
        ]
        LocalPipelineExecutor(pipeline=pipeline, tasks=NUM_PROC, workers=NUM_PROC, logging_dir=str(out / "logs"),
                              skip_completed=False).run()
        return sum(f.stat().st_size for f in out.glob("*.ds")) // 2

    assert _timed(benchmark, request, run, rounds=1) == jsonl_corpus["n_tokens"]
    # Its workers are children of a forkserver, not of this process: their CPU time is not counted.
    del benchmark.extra_info["cpu_s_per_round"]
    _throughput(benchmark, jsonl_corpus["n_tokens"])


_megatron_tokenizer = None


def _megatron_init(path):
    global _megatron_tokenizer
    from megatron.core.tokenizers import MegatronTokenizer

    _megatron_tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": "huggingface", "model_type": "gpt"}, use_fast=True
    )


def _megatron_encode(line):
    return _megatron_tokenizer.tokenize(json.loads(line)["text"])


@pytest.mark.benchmark(group=PEERS_GROUP)
def bench_tokenize_jsonl_megatron_preprocess(benchmark, request, jsonl_corpus):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    outputs = _outputs(jsonl_corpus, "megatron")

    def run():
        # tools/preprocess_data.py: a Pool of workers tokenizing lines (imap, chunks of 32), one builder.
        out = next(outputs)
        builder = IndexedDatasetBuilder(f"{out}.bin", dtype=np.uint16)
        context = multiprocessing.get_context("fork")
        with context.Pool(NUM_PROC, initializer=_megatron_init, initargs=(str(jsonl_corpus["tokenizer"]),)) as pool:
            for file in jsonl_corpus["files"]:
                with open(file, encoding="utf-8") as lines:
                    for ids in pool.imap(_megatron_encode, lines, 32):
                        builder.add_document(ids, [len(ids)])
        builder.finalize(f"{out}.idx")
        return os.path.getsize(f"{out}.bin") // 2

    assert _timed(benchmark, request, run, rounds=1) == jsonl_corpus["n_tokens"]
    _throughput(benchmark, jsonl_corpus["n_tokens"])
