"""Training heads: the dense logits + cross-entropy vs fastlm.train.heads (CLM fused linear + cross-entropy in
chunks, MLM sparse prediction), one training step (forward, backward, AdamW) of the same model side by side.

Shapes of issue 17: GPT-2 (2 layers, 128 wide) with GPT-2's 50,257-token vocabulary, RoBERTa (same size)
with RoBERTa's 50,265, batch 8 x 128, fp32 and bf16 autocast, on CPU. extra_info carries tokens/s and the
peak memory, measured as the growth of the peak resident set of a fresh process over what it held before:
of the loss alone (hidden states -> loss -> gradients, CLM) and of a whole training step (both tasks).
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.memory import peak_rss_kib
from fastlm.train.heads import LMLoss, fused_linear_cross_entropy, row_nll

BATCH, LENGTH, WIDTH, LAYERS = 8, 128, 128, 2
VOCAB = {"clm": 50257, "mlm": 50265}
MLM_RATE = 0.15


def build(task, batch=BATCH):
    """The model (dropout off) and one batch: CLM scores every next token, MLM ~15% of the positions."""
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    if task == "clm":
        model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=2, vocab_size=VOCAB[task],
                                           n_positions=LENGTH, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = RobertaForMaskedLM(RobertaConfig(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2,
                                                 intermediate_size=4 * WIDTH, vocab_size=VOCAB[task],
                                                 max_position_embeddings=LENGTH + 2, type_vocab_size=1,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    input_ids = torch.randint(3, VOCAB[task], (batch, LENGTH))
    labels = input_ids.clone()
    if task == "mlm":
        labels[torch.rand(batch, LENGTH) >= MLM_RATE] = -100
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels


def training_step(task, path, *, bf16=False, batch=BATCH):
    """A closure that runs one optimizer step of the dense or the fastlm head, as the runner's loop does."""
    model, inputs, labels = build(task, batch)
    loss = LMLoss(model, task) if path == "fastlm" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if loss is None:
                rows_nll, rows_targets = row_nll(model(**inputs).logits, labels, shift=task == "clm")
            else:
                rows_nll, rows_targets = loss(labels=labels, **inputs)
        (rows_nll.sum() / rows_targets.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peak_growth_mib(run):
    """Growth of this process's peak resident set (MiB) while `run` runs."""
    before = peak_rss_kib()
    run()
    return (peak_rss_kib() - before) / 1024


def clm_loss(path):
    """The CLM loss alone at GPT-2's vocabulary, as a closure: (B x T, width) hidden states and the tied
    (vocab, width) weight in, NLL and both gradients out."""
    torch.manual_seed(0)
    hidden = torch.randn(BATCH * LENGTH, WIDTH, requires_grad=True)
    weight = torch.randn(VOCAB["clm"], WIDTH, requires_grad=True)
    labels = torch.randint(0, VOCAB["clm"], (BATCH, LENGTH))
    targets = labels[:, 1:].reshape(-1)
    rows = torch.arange(BATCH * LENGTH).view(BATCH, LENGTH)[:, :-1].reshape(-1)

    def dense():
        logits = F.linear(hidden, weight).view(BATCH, LENGTH, -1)
        row_nll(logits, labels, shift=True)[0].sum().backward()

    def fused():
        fused_linear_cross_entropy(hidden[rows], weight, None, targets).sum().backward()

    return dense if path == "dense" else fused


def loss_peak(path):
    small = torch.randn(4, 8, requires_grad=True)  # loads the math libraries and starts their threads first
    F.cross_entropy(F.linear(small, small), torch.zeros(4, dtype=torch.long)).backward()
    return _peak_growth_mib(clm_loss(path))


def step_peak(task, path):
    """The first training step's peak: activations, loss, gradients and AdamW's new state."""
    return _peak_growth_mib(training_step(task, path))


def _in_fresh_process(call):
    """Peak memory needs a process of its own: the resident peak never comes down."""
    code = f"import json; from benchmarks.bench_heads import *; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", ["dense", "fastlm"])
def test_clm_loss(benchmark, path):
    """The loss alone (forward and backward), GPT-2's vocabulary; extra_info: its peak memory."""
    benchmark.group = f"heads: clm loss alone, vocab {VOCAB['clm']}, {BATCH}x{LENGTH} tokens (CPU)"
    benchmark.pedantic(clm_loss(path), rounds=1 if benchmark.disabled else 3, iterations=1)
    benchmark.extra_info["loss_peak_mib"] = _in_fresh_process(f"loss_peak({path!r})")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("path", ["dense", "fastlm"])
@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_training_step(benchmark, task, path, bf16):
    """One optimizer step (forward, backward, AdamW); extra_info: tokens/s and the step's peak memory."""
    benchmark.group = (f"heads: {task} step, {LAYERS} layers x {WIDTH}, vocab {VOCAB[task]}, batch {BATCH}x{LENGTH}, "
                       f"{'bf16 autocast' if bf16 else 'fp32'} (CPU)")
    # A smoke run checks the step runs: one row of the batch (bf16 autocast of the dense head is slow on CPU).
    step = training_step(task, path, bf16=bf16, batch=1 if benchmark.disabled else BATCH)
    if not benchmark.disabled:
        step()  # warm-up: the optimizer's state, the allocator's pools
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 3, iterations=1)
    if not benchmark.disabled:
        benchmark.extra_info["tokens_per_s"] = BATCH * LENGTH / benchmark.stats.stats.median
        if not bf16:
            benchmark.extra_info["step_peak_mib"] = _in_fresh_process(f"step_peak({task!r}, {path!r})")
