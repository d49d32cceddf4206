"""Time to quality: how long transformers.Trainer (AdamW) and the runner (AdamW, and --optim muon) take to reach
the evaluation loss Trainer ends with, on the same model, data, batch and schedule (CPU, fp32), for CLM (GPT-2
with GPT-2's 50,257-token vocabulary) and MLM (RoBERTa with RoBERTa's vocabulary; Trainer with
DataCollatorForLanguageModeling).

A sweep first (not timed by pytest-benchmark): every tool and optimizer at each learning rate of LRS, STEPS
optimizer steps (WARMUP steps of warm-up, then constant: a run stopped at step k has taken exactly the
sweep's first k steps, which a decay planned for the run's length would not give), the evaluation loss
every EVAL_EVERY steps, computed the same way for both tools: summed NLL / targets over the same evaluation
blocks, for MLM with the same fixed masks (each block masked once by a seeded Masker, which the runner's
evaluation also uses). Trainer's best final loss is the target; each runner optimizer's best setting is the
one that first reaches it. Then the benchmarked calls, side by side in one group: Trainer at its best
learning rate for STEPS steps, and the runner at each optimizer's best setting for the steps it needed, each
a whole run in this process (model build, Trainer or engine set-up, training, evaluation, the runner's
outputs). extra_info carries the steps, the target, the wall time against Trainer's and the whole sweep; the
sweep and the ratios are also printed (pytest -s).

Sizes are the training-speed benchmark's: tiny (2 layers x 128) by default, 40 steps; FASTLM_TIME_TO_TARGET=full
adds small (6 layers x 384) and takes 120 steps; FASTLM_TIME_TO_TARGET_STEPS sets the steps. Smoke runs
(--benchmark-disable) sweep one learning rate for SMOKE_STEPS steps on SMOKE_ROWS of the text.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fastlm import run
from fastlm.train.model import PRESETS
from tests.data import wikitext_lines

FULL = os.environ.get("FASTLM_TIME_TO_TARGET") == "full"
STEPS = int(os.environ.get("FASTLM_TIME_TO_TARGET_STEPS", "120" if FULL else "40"))
SMOKE_STEPS = 2
EVAL_EVERY = 10
EVAL_ROWS = 100  # WikiText-2 test rows: ~70 blocks, the evaluation a small part of a run even at 50k logits
SMOKE_ROWS = 10, 400  # a smoke run's evaluation and training rows (an evaluation at 50k logits costs seconds)
WARMUP = 10
BLOCK = 128
BATCH = 8
SEED = 0
LRS = (1e-3, 3e-3, 1e-2)
SMOKE_LRS = (3e-3,)
RUNNER_OPTIMS = ("adamw_torch", "muon")
TASKS = ("clm", "mlm")
# (task, size): the runner's preset and --config_overrides; Trainer's side builds the same config from them.
MODELS = {
    ("clm", "tiny"): ("gpt2-tiny", "n_embd=128"),
    ("clm", "small"): ("gpt2-tiny", "n_layer=6,n_head=6,n_embd=384"),
    ("mlm", "tiny"): ("roberta-tiny", "hidden_size=128,intermediate_size=512"),
    ("mlm", "small"): ("roberta-tiny", "num_hidden_layers=6,num_attention_heads=6,hidden_size=384,intermediate_size=1536"),
}
SIZES = ("tiny", "small") if FULL else ("tiny",)


@pytest.fixture(scope="module")
def stores(request, tmp_path_factory, gpt2_tok, roberta_tok):
    """{task: (train store, evaluation store)}: WikiText-2 valid rows for training, the first EVAL_ROWS test
    rows for evaluation, with GPT-2's tokenizer (CLM) and RoBERTa's with its <s> </s> (MLM)."""
    from fastlm.prepare import prepare

    eval_rows, train_rows = SMOKE_ROWS if request.config.getoption("benchmark_disable") else (EVAL_ROWS, None)
    root = tmp_path_factory.mktemp("time_to_target")
    (root / "train.txt").write_text("".join([line for line in wikitext_lines("valid") if line.strip()][:train_rows]),
                                    encoding="utf-8")
    (root / "eval.txt").write_text("".join([line for line in wikitext_lines("test") if line.strip()][:eval_rows]),
                                   encoding="utf-8")
    found = {}
    for task, tokenizer, specials in (("clm", gpt2_tok, False), ("mlm", roberta_tok, True)):
        found[task] = tuple(prepare([str(root / f"{split}.txt")], root / f"{task}-{split}", tokenizer=tokenizer,
                                    add_special_tokens=specials, progress=False).path for split in ("train", "eval"))
    return found


def _runner_argv(stores, out, *, task, size, optim, lr, steps, eval_every):
    preset, overrides = MODELS[task, size]
    return ["--task", task, "--train_store", str(stores[task][0]), "--eval_store", str(stores[task][1]),
            "--config_name", preset, "--config_overrides", overrides, "--block_size", str(BLOCK),
            "--per_device_train_batch_size", str(BATCH), "--learning_rate", str(lr), "--optim", optim,
            "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", str(WARMUP), "--max_steps", str(steps),
            "--eval_steps", str(eval_every), "--logging_steps", str(eval_every), "--disable_tqdm",
            "--seed", str(SEED), "--output_dir", str(out), "--overwrite_output_dir"]


def _runner(stores, out, *, task, size, optim, lr, steps, eval_every=EVAL_EVERY):
    """{step: eval loss} of one runner run."""
    results = run.train(_runner_argv(stores, out, task=task, size=size, optim=optim, lr=lr, steps=steps,
                                     eval_every=eval_every))
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    curve = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    curve[results["steps"]] = results["eval_loss"]
    return curve


class _Trainer:
    """Trainer on the store's blocks (MLM: masks drawn by DataCollatorForLanguageModeling, as in the tutorial),
    evaluated as the runner evaluates (every `eval_every` steps)."""

    def __init__(self, stores, *, task, size):
        import torch
        from transformers import AutoTokenizer

        from fastlm import Masker, pack_blocks
        from fastlm.store import TokenStore

        self.task, self.size = task, size
        train, held_out = (TokenStore.open(path) for path in stores[task])
        self.tokenizer = AutoTokenizer.from_pretrained(train.tokenizer_dir)
        blocks = pack_blocks(train.tokens, train.offsets, BLOCK)
        rows = blocks.gather(np.arange(len(blocks)))
        if task == "mlm":
            rows = {k: v for k, v in rows.items() if k != "labels"}
        self.dataset = [{k: torch.from_numpy(v[i]) for k, v in rows.items()} for i in range(len(blocks))]
        held = pack_blocks(held_out.tokens, held_out.offsets, BLOCK)
        held = held.gather(np.arange(len(held)))
        if task == "mlm":  # the runner's fixed evaluation masks: Masker.mask_fixed, seeded by --seed
            masker = Masker.from_tokenizer(self.tokenizer, mlm_probability=0.15, seed=SEED)
            held["input_ids"], held["labels"] = masker.mask_fixed(held["input_ids"], held["attention_mask"])
        self.eval_rows = {k: torch.from_numpy(held[k]) for k in ("input_ids", "attention_mask", "labels")}

    def config(self):
        """The runner's preset with the size's overrides, as transformers' config."""
        from transformers import GPT2Config, RobertaConfig

        from fastlm.tokenizer import vocab_size

        preset, overrides = MODELS[self.task, self.size]
        if self.task == "clm":
            config = GPT2Config(vocab_size=vocab_size(self.tokenizer), n_positions=BLOCK, **PRESETS[preset][1])
        else:
            config = RobertaConfig(vocab_size=vocab_size(self.tokenizer), max_position_embeddings=BLOCK + 2,
                                   type_vocab_size=1, pad_token_id=self.tokenizer.pad_token_id, **PRESETS[preset][1])
        config.update_from_string(overrides)
        return config

    def model(self):
        from transformers import GPT2LMHeadModel, RobertaForMaskedLM

        return (GPT2LMHeadModel if self.task == "clm" else RobertaForMaskedLM)(self.config())

    def eval_loss(self, model):
        import torch

        from fastlm.train.heads import row_nll

        model.eval()
        nll, targets = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.eval_rows["input_ids"]), 8):
                batch = {k: v[start:start + 8] for k, v in self.eval_rows.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                rows_nll, rows_targets = row_nll(logits, batch["labels"], shift=self.task == "clm")
                nll, targets = nll + float(rows_nll.sum()), targets + int(rows_targets.sum())
        model.train()
        return nll / targets

    def train(self, out, *, lr, steps, eval_every=None):
        """{step: eval loss} (only the final one without eval_every)."""
        import torch
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

        curve, outer = {}, self

        class Evaluate(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if eval_every and state.global_step % eval_every == 0:
                    curve[state.global_step] = outer.eval_loss(model)

        torch.manual_seed(SEED)
        model = self.model()
        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=0.15) if self.task == "mlm" else None
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=lr,
                                 max_steps=steps, lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP,
                                 max_grad_norm=1.0, dataloader_num_workers=0, report_to=[], use_cpu=True,
                                 save_strategy="no", logging_steps=steps, disable_tqdm=True, seed=SEED)
        Trainer(model=model, args=args, train_dataset=self.dataset, data_collator=collator,
                callbacks=[Evaluate()]).train()
        curve[steps] = self.eval_loss(model)
        return curve


def _first_reaching(curve, target):
    return next((step for step in sorted(curve) if curve[step] <= target), None)


_SWEEPS = {}
_TRAINER_WALL_S = {}


def _sweep(task, size, stores, tmp_path_factory, steps, lrs):
    """Every tool and optimizer at every learning rate: {(tool, optim, lr): {step: eval loss}}, and the
    target (Trainer's best final eval loss) with each contender's best setting and the steps it needed."""
    if (task, size, steps) in _SWEEPS:
        return _SWEEPS[task, size, steps]
    root = tmp_path_factory.mktemp(f"sweep_{task}_{size}")
    trainer = _Trainer(stores, task=task, size=size)
    eval_every = min(EVAL_EVERY, steps)
    curves = {}
    for lr in lrs:
        curves["trainer", "adamw", lr] = trainer.train(root / f"trainer_{lr}", lr=lr, steps=steps, eval_every=eval_every)
        for optim in RUNNER_OPTIMS:
            out = root / f"{optim}_{lr}"
            curves["runner", optim, lr] = _runner(stores, out, task=task, size=size, optim=optim, lr=lr, steps=steps,
                                                  eval_every=eval_every)
            ours = json.loads((out / "config.json").read_text())
            theirs = trainer.config().to_dict()
            shape = set(PRESETS[MODELS[task, size][0]][1]) | {kv.split("=")[0] for kv in MODELS[task, size][1].split(",")}
            assert {k: ours[k] for k in shape | {"vocab_size"}} == {k: theirs[k] for k in shape | {"vocab_size"}}
    trainer_lr = min(lrs, key=lambda lr: curves["trainer", "adamw", lr][steps])
    target = curves["trainer", "adamw", trainer_lr][steps]
    best = {}
    for optim in RUNNER_OPTIMS:
        reached = [(_first_reaching(curves["runner", optim, lr], target), lr) for lr in lrs]
        reached = [(step, lr) for step, lr in reached if step is not None]
        best[optim] = min(reached) if reached else (None, min(lrs, key=lambda lr: curves["runner", optim, lr][steps]))
    sweep = dict(curves=curves, trainer=trainer, trainer_lr=trainer_lr, target=target, best=best)
    _print_sweep(task, size, steps, sweep)
    _SWEEPS[task, size, steps] = sweep
    return sweep


def _print_sweep(task, size, steps, sweep):
    print(f"\n[time to target] {task} {size} ({MODELS[task, size][1]}), batch {BATCH} x block {BLOCK}, {steps} steps; "
          f"target = Trainer's best final eval loss {sweep['target']:.4f} (lr {sweep['trainer_lr']:g})")
    for (tool, optim, lr), curve in sweep["curves"].items():
        step = _first_reaching(curve, sweep["target"])
        losses = " ".join(f"{curve[s]:.3f}" for s in sorted(curve))
        print(f"  {tool:7} {optim:11} lr {lr:<6g} eval loss by step {losses}  reaches target at step "
              f"{step if step is not None else '-'}")


def _setup(benchmark, task, size, stores, tmp_path_factory):
    steps, lrs = (SMOKE_STEPS, SMOKE_LRS) if benchmark.disabled else (STEPS, LRS)
    benchmark.group = f"time to Trainer's final eval loss: {task} {size}, batch {BATCH} x {BLOCK} (CPU)"
    return steps, _sweep(task, size, stores, tmp_path_factory, steps, lrs)


def _record(benchmark, sweep, steps_to_target):
    benchmark.extra_info["target_eval_loss"] = sweep["target"]
    benchmark.extra_info["steps_to_target"] = steps_to_target
    benchmark.extra_info["sweep"] = {f"{tool} {optim} lr {lr:g}": {str(k): v for k, v in curve.items()}
                                     for (tool, optim, lr), curve in sweep["curves"].items()}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("task", TASKS)
def bench_trainer_adamw(benchmark, task, size, stores, tmp_path_factory, tmp_path):
    steps, sweep = _setup(benchmark, task, size, stores, tmp_path_factory)
    lr = sweep["trainer_lr"]
    start = time.perf_counter()
    benchmark.pedantic(sweep["trainer"].train, args=(tmp_path,), kwargs=dict(lr=lr, steps=steps), rounds=1,
                       iterations=1)
    _TRAINER_WALL_S[task, size] = benchmark.extra_info["wall_s"] = time.perf_counter() - start
    benchmark.extra_info["lr"] = lr
    _record(benchmark, sweep, steps)


@pytest.mark.parametrize("optim", RUNNER_OPTIMS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("task", TASKS)
def bench_runner(benchmark, task, size, optim, stores, tmp_path_factory, tmp_path):
    steps, sweep = _setup(benchmark, task, size, stores, tmp_path_factory)
    step, lr = sweep["best"][optim]
    benchmark.extra_info["lr"] = lr
    _record(benchmark, sweep, step)
    step = step or steps  # never reached it: timed for the whole run, steps_to_target None says so
    start = time.perf_counter()
    curve = benchmark.pedantic(_runner, args=(stores, tmp_path), rounds=1, iterations=1,
                               kwargs=dict(task=task, size=size, optim=optim, lr=lr, steps=step, eval_every=step))
    wall_s = benchmark.extra_info["wall_s"] = time.perf_counter() - start
    assert curve[step] == pytest.approx(sweep["curves"]["runner", optim, lr][step], rel=1e-4)
    # Both tools' losses are one measure: Trainer's evaluation of the runner's saved model gives the runner's.
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    saved = (AutoModelForCausalLM if task == "clm" else AutoModelForMaskedLM).from_pretrained(tmp_path)
    assert sweep["trainer"].eval_loss(saved) == pytest.approx(curve[step], rel=1e-4)
    if (task, size) in _TRAINER_WALL_S:
        ratio = benchmark.extra_info["wall_vs_trainer"] = wall_s / _TRAINER_WALL_S[task, size]
        print(f"\n[time to target] {task} {size}: runner {optim} lr {lr:g} {wall_s:.1f} s to step {step} vs Trainer "
              f"{_TRAINER_WALL_S[task, size]:.1f} s for {steps} steps: {ratio:.2f}x")
