"""Mixture benchmarks: building the blending index, and data loading in a mixture run.

- "blend": the order of 1M samples from 3 and from 100 sources (random weights), fastlm's kernel vs
  Megatron-LM's build_blending_indices (megatron-core's compiled helpers, the same rule; the outputs are
  asserted equal) where megatron-core is installed, else vs a numpy loop of the same greedy rule.
  extra_info: samples/s.
- "mixture run": 20 MLM steps of a tiny RoBERTa on a 3-source mixture; extra_info carries the
  runner's data_time_fraction (time waiting for batches / loop time), which should stay below 1%.

    make bench     # or: .venv/bin/python -m pytest benchmarks/bench_blending.py --benchmark-only
"""
import numpy as np
import pytest

from fastlm import run
from fastlm.blending import blending_index, normalized_weights
from tests.data import wikitext_lines

N_SAMPLES = 1_000_000
SOURCES = [3, 100]


def _megatron_helpers():
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        return None
    return helpers_cpp


@pytest.fixture(scope="module", params=SOURCES, ids=lambda n: f"{n} sources")
def weights(request):
    return normalized_weights(np.random.default_rng(request.param).random(request.param) + 0.01)


def numpy_blending_index(weights, n_samples):
    """The greedy rule in numpy: one vectorised argmax over the sources per sample."""
    counts = np.zeros(len(weights))
    source = np.empty(n_samples, dtype=np.int16)
    sample = np.empty(n_samples, dtype=np.int64)
    for i in range(n_samples):
        best = int(np.argmax(weights * max(i, 1) - counts))
        source[i], sample[i] = best, counts[best]
        counts[best] += 1
    return source, sample


def bench_fastlm_blend(benchmark, weights):
    benchmark.group = f"blend: 1M samples, {len(weights)} sources"
    source, sample, _ = benchmark(blending_index, weights, N_SAMPLES)
    assert len(source) == N_SAMPLES
    if benchmark.stats:
        benchmark.extra_info["samples_per_s"] = N_SAMPLES / benchmark.stats.stats.min


def bench_baseline_blend(benchmark, weights):
    benchmark.group = f"blend: 1M samples, {len(weights)} sources"
    helpers = _megatron_helpers()
    if helpers is None:  # the same rule in numpy: too slow for a million samples a round, so 100k
        n = N_SAMPLES // 10
        benchmark.extra_info["baseline"] = f"numpy loop ({n} samples; megatron-core is not installed)"
        source, sample = benchmark.pedantic(numpy_blending_index, args=(weights, n), rounds=1, iterations=1)
    else:
        n = N_SAMPLES
        benchmark.extra_info["baseline"] = "megatron-core build_blending_indices"
        source, sample = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int64)
        benchmark(helpers.build_blending_indices, source, sample, weights, len(weights), n, False)
    expected_source, expected_sample, _ = blending_index(weights, n)
    assert np.array_equal(source, expected_source) and np.array_equal(sample, expected_sample)
    if benchmark.stats:
        benchmark.extra_info["samples_per_s"] = n / benchmark.stats.stats.min


@pytest.fixture(scope="module")
def mlm_sources(tmp_path_factory, roberta_tok):
    """Three RoBERTa-tokenized stores of different sizes: WikiText-2 valid and test in three parts."""
    from fastlm.prepare import prepare

    lines = [line for line in wikitext_lines("valid") + wikitext_lines("test") if line.strip()]
    root = tmp_path_factory.mktemp("bench_mixture")
    paths = []
    for name, part in (("big", lines[:800]), ("mid", lines[800:1200]), ("small", lines[1200:1400])):
        (root / f"{name}.txt").write_text("".join(part), encoding="utf-8")
        prepare([str(root / f"{name}.txt")], root / name, tokenizer=roberta_tok, add_special_tokens=True,
                progress=False)
        paths.append(root / name)
    return paths


@pytest.mark.benchmark(group="mixture run: tiny RoBERTa MLM, 3 sources, block 128, batch 8, 20 steps (CPU)")
def bench_mixture_mlm_run(benchmark, mlm_sources, tmp_path):
    big, mid, small = mlm_sources
    argv = ["--task", "mlm", "--train_store", f"{big}:0.5", f"{mid}:0.3", f"{small}:0.2", "--config_name",
            "roberta-tiny", "--block_size", "128", "--per_device_train_batch_size", "8", "--max_steps", "20",
            "--validation_split_percentage", "0", "--logging_steps", "20", "--disable_tqdm", "--output_dir", str(tmp_path)]
    results = benchmark.pedantic(run.train, args=(argv,), rounds=1, iterations=1)
    assert results["steps"] == 20 and sum(s["blocks_trained"] for s in results["train_sources"].values()) == 160
    benchmark.extra_info["data_time_fraction"] = results["data_time_fraction"]
    benchmark.extra_info["steps_per_s"] = results["train_steps_per_s"]
