"""Training: the runner (DeepSpeed engine over packed blocks, its fused CLM loss and sparse MLM head) vs
transformers.Trainer on the same tiny model, data, batch, schedule and step count on CPU: CLM on a GPT-2
(2 layers, 64 wide) with a 1,024-entry BPE and with the real GPT-2 vocabulary (50,257: the LM head and its
softmax then dominate a step), MLM on a RoBERTa of the same size with RoBERTa's vocabulary (Trainer with
DataCollatorForLanguageModeling); and, when a GPU is present, GPT-2-124M at block 1024 in bf16 with MFU.

Each benchmarked call is a whole run (model build, engine or Trainer set-up, STEPS optimizer steps,
and for the runner its outputs: model, metrics, plot); extra_info carries each tool's time to its first
optimizer step and the steps/s and tokens/s of its training loop, and for the runner the fraction of
loop time spent waiting for the DataLoader. Smoke runs (--benchmark-disable) take SMOKE_STEPS steps.
"""
import json
import math
import time

import numpy as np
import pytest

from fastlm import run
from fastlm.tokenizer import vocab_size
from fastlm.train.model import PRESETS
from tests.data import wikitext_lines

STEPS = 40
SMOKE_STEPS = 2
BLOCK = 128
BATCH = 8
LR = 1e-3
VOCABS = ("bpe-1024", "gpt2-50257", "roberta-50265")
TASKS = {"bpe-1024": "clm", "gpt2-50257": "clm", "roberta-50265": "mlm"}


@pytest.fixture(scope="module")
def train_stores(tmp_path_factory, gpt2_tok, roberta_tok):
    """The same WikiText-2 text as three stores: a 1,024-entry BPE trained on it, GPT-2's and RoBERTa's
    tokenizers."""
    from fastlm.prepare import prepare

    root = tmp_path_factory.mktemp("bench_train")
    lines = [line for line in wikitext_lines("valid") if line.strip()]
    (root / "train.txt").write_text("".join(lines[:1500]), encoding="utf-8")
    prepare([str(root / "train.txt")], root / "bpe-1024", train_tokenizer=True, vocab_size=1024, progress=False)
    prepare([str(root / "train.txt")], root / "gpt2-50257", tokenizer=gpt2_tok, progress=False)
    prepare([str(root / "train.txt")], root / "roberta-50265", tokenizer=roberta_tok, progress=False)
    return {vocab: root / vocab for vocab in VOCABS}


def _steps(benchmark):
    return SMOKE_STEPS if benchmark.disabled else STEPS


def _group(benchmark, vocab):
    steps = _steps(benchmark)
    model = "GPT-2" if TASKS[vocab] == "clm" else "RoBERTa"
    benchmark.group = (f"train: {TASKS[vocab]}, tiny {model}, vocab {vocab}, block {BLOCK}, batch {BATCH}, "
                       f"{steps} steps (CPU)")
    return steps


def _runner_argv(store, out, steps, task="clm"):
    return ["--task", task, "--train_store", str(store), "--config_name", "gpt2-tiny" if task == "clm" else "roberta-tiny",
            "--block_size", str(BLOCK), "--per_device_train_batch_size", str(BATCH), "--learning_rate", str(LR),
            "--max_steps", str(steps), "--validation_split_percentage", "0", "--logging_steps", str(steps),
            "--disable_tqdm", "--output_dir", str(out)]


@pytest.mark.parametrize("vocab", VOCABS)
def bench_runner(benchmark, vocab, train_stores, tmp_path):
    steps = _group(benchmark, vocab)
    results = benchmark.pedantic(run.train, args=(_runner_argv(train_stores[vocab], tmp_path, steps, TASKS[vocab]),),
                                 rounds=3, iterations=1)
    assert results["steps"] == steps
    benchmark.extra_info["time_to_first_step_s"] = results["time_to_first_step_s"]
    benchmark.extra_info["steps_per_s"] = results["train_steps_per_s"]
    benchmark.extra_info["tokens_per_s"] = results["train_tokens_per_s_per_rank"]
    benchmark.extra_info["dataloader_time_fraction"] = results["data_time_fraction"]


@pytest.mark.parametrize("vocab", VOCABS)
def bench_hf_trainer(benchmark, vocab, train_stores, tmp_path):
    import torch
    from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel,
                              RobertaConfig, RobertaForMaskedLM, Trainer, TrainerCallback, TrainingArguments)

    from fastlm import pack_blocks
    from fastlm.store import TokenStore

    steps = _group(benchmark, vocab)
    store = TokenStore.open(train_stores[vocab])
    tokenizer = AutoTokenizer.from_pretrained(store.tokenizer_dir)
    blocks = pack_blocks(store.tokens, store.offsets, BLOCK)
    rows = blocks.gather(np.arange(len(blocks)))
    mlm = TASKS[vocab] == "mlm"
    if mlm:  # the collator draws the masks and the labels, as in the tutorial
        rows = {k: v for k, v in rows.items() if k != "labels"}
    dataset = [{k: torch.from_numpy(v[i]) for k, v in rows.items()} for i in range(len(blocks))]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15) if mlm else None

    def model():
        if mlm:  # the runner's roberta-tiny preset
            return RobertaForMaskedLM(RobertaConfig(vocab_size=vocab_size(tokenizer), max_position_embeddings=BLOCK + 2,
                                                    type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                                                    **PRESETS["roberta-tiny"][1]))
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size(tokenizer), n_positions=BLOCK, **PRESETS["gpt2-tiny"][1]))

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.done = time.perf_counter()

    def train():
        first_step = FirstStep()
        start = time.perf_counter()
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=LR,
                                 max_steps=steps, lr_scheduler_type="linear", max_grad_norm=1.0,
                                 dataloader_num_workers=0, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_steps=steps, disable_tqdm=True)
        output = Trainer(model=model(), args=args, train_dataset=dataset, data_collator=collator,
                         callbacks=[first_step]).train()
        return output, first_step.done - start

    output, first_step_s = benchmark.pedantic(train, rounds=3, iterations=1)
    assert output.global_step == steps and math.isfinite(output.training_loss)
    benchmark.extra_info["time_to_first_step_s"] = first_step_s
    benchmark.extra_info["steps_per_s"] = output.metrics["train_steps_per_second"]
    benchmark.extra_info["tokens_per_s"] = output.metrics["train_steps_per_second"] * BATCH * BLOCK


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.benchmark(group="train: GPT-2-124M, block 1024, bf16 (GPU)")
def bench_runner_gpt2_124m_gpu(benchmark, tmp_path, gpt2_tok):
    from fastlm.prepare import prepare

    text = tmp_path / "wiki.txt"
    text.write_text("".join(wikitext_lines("valid") + wikitext_lines("test")), encoding="utf-8")
    store = prepare([str(text)], tmp_path / "store", tokenizer=gpt2_tok, progress=False)
    argv = ["--task", "clm", "--train_store", str(store.path), "--config_name", "gpt2-124m", "--block_size", "1024",
            "--per_device_train_batch_size", "8", "--precision", "bf16", "--max_steps", "50", "--logging_steps", "10",
            "--validation_split_percentage", "0", "--learning_rate", "6e-4", "--disable_tqdm",
            "--output_dir", str(tmp_path / "run")]
    results = benchmark.pedantic(run.train, args=(argv,), rounds=1, iterations=1)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in metrics if "mfu" in m][1:]  # the first window includes warm-up
    benchmark.extra_info["tokens_per_s"] = float(np.mean([m["tokens_per_s"] for m in steady]))
    benchmark.extra_info["mfu"] = float(np.mean([m["mfu"] for m in steady]))
    assert results["steps"] == 50
