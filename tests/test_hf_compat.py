"""Hugging Face run_clm.py / run_mlm.py command lines and the tutorial's TrainingArguments, run unchanged
through the runner (local files and tiny local models instead of hub data and hub models, a few steps
each): they parse, train, leave their outputs where HF users look, and their numbers relate to
run_clm's and Trainer's as docs/from-run-clm.md says. Plus the runner's behaviour when a rank stops."""
import json
import lzma
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastlm import run
from fastlm.train.dist import free_port
from tests.data import fixture_path

HF_TRAIN_KEYS = {"epoch", "total_flos", "train_loss", "train_runtime", "train_samples", "train_samples_per_second",
                 "train_steps_per_second"}
HF_EVAL_KEYS = {"epoch", "eval_loss", "perplexity", "eval_runtime", "eval_samples", "eval_samples_per_second",
                "eval_steps_per_second"}


def _raw_lines(split, n):
    """The first n lines of a WikiText-2 raw file as they are on disk (blank lines are " \\n")."""
    with lzma.open(fixture_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8") as f:
        return [line for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """run_clm.py wants .txt files: 200 WikiText-2 validation lines to train on, 60 test lines to evaluate."""
    root = tmp_path_factory.mktemp("hf_files")
    (root / "train.txt").write_text("".join(_raw_lines("valid", 200)), encoding="utf-8")
    (root / "valid.txt").write_text("".join(_raw_lines("test", 60)), encoding="utf-8")
    return root / "train.txt", root / "valid.txt"


@pytest.fixture(scope="module")
def gpt2_dir(gpt2_tok, tmp_path_factory):
    """A stand-in for `--model_name_or_path gpt2`: a tiny GPT-2 with the real GPT-2 tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2_tiny")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(gpt2_tok))).save_pretrained(root)
    gpt2_tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def bert_dir(bert_tok, tmp_path_factory):
    """A stand-in for `--model_name_or_path bert-base-uncased`: a tiny BERT with the real WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("bert_tiny")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                               vocab_size=len(bert_tok))).save_pretrained(root)
    bert_tok.save_pretrained(root)
    return root


def _readme_command(model, files, out, *extra):
    """The language-modeling README's "your own files" command, word for word, plus `extra`."""
    return ["--model_name_or_path", str(model), "--train_file", str(files[0]), "--validation_file", str(files[1]),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--do_train", "--do_eval",
            "--output_dir", str(out), *extra]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clm_run(gpt2_dir, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_clm")
    results = run.train(_readme_command(gpt2_dir, files, out, "--max_steps", "4", "--save_steps", "4", "--disable_tqdm"))
    return out, results


def _run_clm_blocks(tokenizer, path, block_size):
    """run_clm.py's evaluation blocks: HF's text loader (whitespace-only rows kept, line breaks kept),
    the tokenizer per row, concatenated and cut (one map batch: fewer than 1000 rows)."""
    import datasets

    rows = list(datasets.load_dataset("text", data_files=str(path), keep_linebreaks=True)["train"]["text"])
    assert len(rows) < 1000
    ids = [i for row in tokenizer(rows)["input_ids"] for i in row]
    n = len(ids) // block_size
    return np.array(ids[:n * block_size]).reshape(n, block_size), rows


def test_run_clm_readme_command_runs_unchanged(clm_run, gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, results = clm_run
    assert results["task"] == "clm" and results["steps"] == 4  # --task inferred from the GPT-2 config
    model = AutoModelForCausalLM.from_pretrained(out)  # the model and tokenizer at output_dir, as run_clm leaves them
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(gpt2_dir).get_vocab()
    assert model.config.n_embd == 32
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert HF_TRAIN_KEYS <= set(train) and HF_EVAL_KEYS <= set(evaluation)
    assert json.loads((out / "all_results.json").read_text()) == {**train, **evaluation}
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]))
    assert evaluation["eval_loss"] == results["eval_loss"] and train["train_loss"] == results["train_loss"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [4]  # --logging_steps 10: the last step
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert evals and {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"} <= set(evals[-1])
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second",
            "total_flos"} <= set(state["log_history"][-1])
    # Trainer's total_flos: 6 x tokens x parameters outside the embeddings (GPT-2's wte and wpe)
    non_embedding = model.num_parameters(exclude_embeddings=True)
    assert train["total_flos"] == results["total_flos"] == 6 * results["tokens_seen"] * non_embedding
    assert results["train_flops"] > results["total_flos"]  # fastlm's own count keeps the embeddings and attention
    # No --block_size: run_clm's default, the tokenizer's model_max_length (GPT-2: 1024), is what trained and
    # what the checkpoint records.
    saved = json.loads((out / "checkpoint-4" / "fastlm.json").read_text())
    assert saved["settings"]["block_size"] == 1024 and results["tokens_seen"] % 1024 == 0


def test_evaluation_blocks_and_loss_relate_to_run_clm_and_trainer(clm_run, files):
    """The same evaluation blocks as run_clm.py (its text loader keeps WikiText's " \\n" lines, and so does the
    runner by default), blocks of run_clm's default size (GPT-2's 1024); Trainer's eval_loss on them is fastlm's
    x 1023/1024: Trainer 5.24 divides GPT-2's summed loss by every label in the block, fastlm by the 1023
    next-token targets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    out, results = clm_run
    blocks, rows = _run_clm_blocks(AutoTokenizer.from_pretrained(out), files[1], 1024)
    assert sum(row.isspace() for row in rows) > 5  # the whitespace-only rows are there to be kept
    assert results["eval_blocks"] == len(blocks) > 0 and results["eval_tokens"] == len(blocks) * 1023
    dataset = [{"input_ids": torch.from_numpy(row), "labels": torch.from_numpy(row)} for row in blocks]
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(out), data_collator=default_data_collator,
                      args=TrainingArguments(output_dir=str(out / "hf"), per_device_eval_batch_size=8, report_to=[],
                                             use_cpu=True), eval_dataset=dataset)
    hf = trainer.evaluate()  # batch losses weighted by batch size: the tail batch is no bias here
    assert hf["eval_loss"] == pytest.approx(results["eval_loss"] * 1023 / 1024, rel=1e-5)


def test_evaluate_only_and_the_shared_store_cache(clm_run, files, tmp_path, monkeypatch):
    """--do_eval alone evaluates --model_name_or_path without training (the only way used to be one step at a
    tiny learning rate), from the stores the first run prepared in the shared cache."""
    import importlib

    prepare_module = importlib.import_module("fastlm.prepare")  # `fastlm.prepare` is also the function's name
    out, results = clm_run
    calls = []
    real = prepare_module.prepare
    monkeypatch.setattr(prepare_module, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    evaluated = run.train(["--model_name_or_path", str(out), "--train_file", str(files[0]), "--validation_file",
                           str(files[1]), "--do_eval", "--output_dir", str(tmp_path), "--disable_tqdm"])
    assert calls == []  # nothing tokenized again for a new output_dir
    assert evaluated["steps"] == 0 and evaluated["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert HF_EVAL_KEYS <= set(json.loads((tmp_path / "eval_results.json").read_text()))
    assert not (tmp_path / "train_results.json").exists() and not (tmp_path / "config.json").exists()


def test_the_tutorial_training_arguments(gpt2_dir, files, tmp_path, capsys):
    """The seed notebook's TrainingArguments(eval_strategy="epoch", learning_rate=2e-5, weight_decay=0.01,
    push_to_hub=True) as flags, with HF's epoch/save/logging strategies and a fractional epoch count."""
    argv = ["--model_name_or_path", str(gpt2_dir), "--train_file", str(files[0]), "--validation_file", str(files[1]),
            "--max_train_samples", "24", "--max_eval_samples", "8", "--disable_tqdm",  # 3 steps an epoch, 1 eval batch
            "--block_size", "128",
            "--output_dir", str(tmp_path), "--eval_strategy", "epoch", "--learning_rate", "2e-5",
            "--weight_decay", "0.01", "--push_to_hub", "--num_train_epochs", "1.5", "--logging_strategy", "epoch",
            "--save_strategy", "epoch", "--save_total_limit", "1"]
    results = run.train(argv)
    assert "--push_to_hub has no effect here" in capsys.readouterr().err
    per_epoch = 3
    assert results["steps"] == 5  # ceil(1.5 epochs x 3 steps)
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [per_epoch, results["steps"]]
    assert [m["step"] for m in metrics if "loss" in m] == [per_epoch, results["steps"]]
    saved = [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name]
    assert saved == [f"checkpoint-{per_epoch}"]  # limit 1; the last step is not an epoch's end

    # A new run into the same output_dir would leave those checkpoints for a later --resume to pick up.
    with pytest.raises(SystemExit) as exit_:
        run.train([*argv[:argv.index("--eval_strategy")], "--max_steps", "1"])
    assert exit_.value.code == 2
    assert "holds the checkpoints of an earlier run" in capsys.readouterr().err
    run.train([*argv[:argv.index("--eval_strategy")], "--max_steps", "1", "--overwrite_output_dir", "--disable_tqdm"])
    assert not any("checkpoint" in p.name for p in tmp_path.iterdir())
    assert [m["step"] for m in _metrics(tmp_path) if "loss" in m] == [1]


def test_run_mlm_readme_command_with_line_by_line(bert_dir, files, tmp_path):
    from transformers import AutoModelForMaskedLM

    results = run.train(_readme_command(bert_dir, files, tmp_path, "--line_by_line", "--max_seq_length", "64",
                                        "--max_steps", "2", "--disable_tqdm"))
    assert results["task"] == "mlm"  # inferred: BERT has a masked-LM head
    lines = files[1].read_text(encoding="utf-8").splitlines()
    assert results["eval_blocks"] == sum(not line.isspace() and line != "" for line in lines)  # one line a block
    assert math.isfinite(results["perplexity"])
    assert AutoModelForMaskedLM.from_pretrained(tmp_path).config.hidden_size == 32


def test_max_samples_take_the_first_blocks(gpt2_dir, files, tmp_path):
    results = run.train(_readme_command(gpt2_dir, files, tmp_path, "--max_train_samples", "16", "--max_eval_samples",
                                        "3", "--num_train_epochs", "1", "--block_size", "128", "--disable_tqdm"))
    assert results["train_blocks"] == 16 and results["steps"] == 2
    assert results["eval_blocks"] == 3 and results["eval_tokens"] == 3 * 127


def test_a_stopped_rank_is_named_after_the_ddp_timeout(tmp_path):
    """Two CPU ranks; rank 1 gets SIGSTOP mid-training. Rank 0 must not wait gloo's default minutes: after
    --ddp_timeout it names rank 1 and exits non-zero. (Neither rank compiles DeepSpeed's shm op.)"""
    from fastlm.prepare import prepare

    text = tmp_path / "train.txt"
    text.write_text("".join(line for line in _raw_lines("valid", 300) if not line.isspace()), encoding="utf-8")
    prepare([str(text)], tmp_path / "store", train_tokenizer=True, vocab_size=300, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(Path(run.__file__).parents[1])}
    argv = [sys.executable, "-m", "fastlm.run", "--train_store", str(tmp_path / "store"), "--config_name", "gpt2-tiny",
            "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "100000", "--logging_steps", "1",
            "--validation_split_percentage", "0", "--ddp_timeout", "4", "--disable_tqdm", "--output_dir", str(tmp_path / "out")]
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "training never started"
            time.sleep(0.2)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        stdout, stderr = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 1
    assert "rank 0: rank(s) 1 stopped responding (no sign of life for 4 s; --ddp_timeout 4 s)" in stderr
    assert "Traceback" not in stderr and waited < 60
    assert "shm_comm" not in stdout + stderr


def _rank0_works_the_others_wait(rank, port, out):
    import torch.distributed as dist

    from fastlm.train import dist as run_dist
    from fastlm.train.errors import ConfigError
    from fastlm.train.watchdog import RankWatchdog

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    watchdog = RankWatchdog.start(1, rank=rank, world_size=2)
    run_dist.rank0_then_others(lambda: time.sleep(4), rank=rank, what="prepare the data")

    def refuse():
        raise ConfigError("--resume: checkpoint file x is corrupt")

    try:
        run_dist.rank0_then_others(refuse, rank=rank, what="verify the checkpoint")
    except ConfigError as error:
        (Path(out) / f"rank{rank}").write_text(str(error))
    watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_wait_for_rank_0_without_being_reported_as_stopped_and_share_its_config_errors(tmp_path):
    """Rank 1 waits 4 s for rank 0's preparation under a 1 s --ddp_timeout: its watchdog's heartbeats must
    go on meanwhile (a blocking wait in the rendezvous store would hold the client they share). A
    ConfigError on rank 0 is the same ConfigError on every rank (one line, exit status 2 each)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank0_works_the_others_wait, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["--resume: checkpoint file x is corrupt"] * 2
