"""The runner end to end on CPU: tiny models, a few steps each, in-process (single rank, gloo) except the
2-rank test, which goes through the `deepspeed` launcher."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastlm import run
from fastlm.train import checkpoints, config, data, demo, evaluation
from fastlm.train import dist as run_dist
from fastlm.train import main as run_main
from fastlm.train import model as model_lib
from fastlm.train.errors import Diverged
from fastlm.train.heads import LMLoss, row_nll
from tests.data import fixture_path, wikitext_lines

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataloader_num_workers", "0", "--disable_tqdm", "--logging_steps", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """WikiText-2 validation rows: 1200 for training, 150 for evaluation (one document a line)."""
    lines = [line for line in wikitext_lines("valid") if line.strip()]
    root = tmp_path_factory.mktemp("text")
    (root / "train.txt").write_text("".join(lines[:1200]), encoding="utf-8")
    (root / "valid.txt").write_text("".join(lines[1200:1350]), encoding="utf-8")
    return root / "train.txt", root / "valid.txt"


@pytest.fixture(scope="module")
def clm_stores(text_files, tmp_path_factory):
    """Token stores with a 1024-entry byte-level BPE trained on the training text."""
    from fastlm.prepare import prepare

    root = tmp_path_factory.mktemp("clm_store")
    train = prepare([str(text_files[0])], root / "train", train_tokenizer=True, vocab_size=1024, progress=False)
    prepare([str(text_files[1])], root / "valid", tokenizer=str(train.tokenizer_dir), progress=False)
    return root / "train", root / "valid"


@pytest.fixture(scope="module")
def mlm_stores(text_files, roberta_tok, tmp_path_factory):
    from fastlm.prepare import prepare

    root = tmp_path_factory.mktemp("mlm_store")
    train_lines = text_files[0].read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    (root / "train.txt").write_text("".join(train_lines), encoding="utf-8")
    # A small evaluation set: Trainer gets it as one batch, and RoBERTa's logits are 50265 wide.
    valid_lines = text_files[1].read_text(encoding="utf-8").splitlines(keepends=True)[:30]
    (root / "valid.txt").write_text("".join(valid_lines), encoding="utf-8")
    prepare([str(root / "train.txt")], root / "train", tokenizer=roberta_tok, add_special_tokens=True, progress=False)
    prepare([str(root / "valid.txt")], root / "valid", tokenizer=roberta_tok, add_special_tokens=True, progress=False)
    return root / "train", root / "valid"


def _clm_args(stores, out, *extra):
    return ["--task", "clm", "--train_store", str(stores[0]), "--eval_store", str(stores[1]),
            "--config_name", "gpt2-tiny", "--block_size", "64", "--per_device_train_batch_size", "8",
            "--learning_rate", "3e-3", "--output_dir", str(out), *TINY, *extra]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out):
    return {m["step"]: m["loss"] for m in _metrics(out) if "loss" in m}


@pytest.fixture(scope="module")
def clm_run(clm_stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("clm_run")
    results = run.train(_clm_args(clm_stores, out, "--max_steps", "30", "--warmup_steps", "3",
                                 "--save_steps", "15", "--eval_steps", "15"))
    return out, results


def test_a_hold_out_too_small_for_one_document_names_the_flag(clm_stores, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", str(clm_stores[0]), "--config_name", "gpt2-tiny", "--output_dir", str(tmp_path),
                  "--validation_split_percentage", "0.01", *TINY])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--validation_split_percentage 0.01: cannot hold out 0.01% of 1200 documents" in err
    assert "Traceback" not in err


# --- perplexity arithmetic ----------------------------------------------------------------------------

def test_perplexity_is_token_weighted_and_overflows_to_inf():
    assert evaluation.perplexity(math.log(5.0) * 7, 7) == pytest.approx(5.0)
    assert evaluation.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="zero target tokens"):
        evaluation.perplexity(0.0, 0)


def _token_nll(logits, labels, *, shift):
    """A batch's summed token NLL and target count, from the dense loss's rows."""
    nll, n = row_nll(logits, labels, shift=shift)
    return nll.sum(), n.sum()


def test_token_nll_counts_only_targets_and_shifts_for_clm():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, -100, 4, 5], [6, -100, -100, -100, -100]])
    nll, n = _token_nll(logits, labels, shift=True)
    logp = torch.log_softmax(logits, -1)
    expected = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    assert int(n) == 3 == len(expected)
    assert float(nll) == pytest.approx(float(sum(expected)), rel=1e-6)
    nll, n = _token_nll(logits, labels, shift=False)
    assert int(n) == 5


def _config(*argv):
    return config.parse(["--train_store", "s", "--config_name", "gpt2-tiny", *argv])


def _eval_args(cfg):
    """evaluation.evaluate's settings from a run configuration."""
    return dict(task=cfg.task, batch_size=cfg.evaluation.per_device_eval_batch_size)


def _masker(tokenizer):
    return data.make_masker(config.DataConfig(train_stores=("s",), seed=3), tokenizer)


class _Reduced(Exception):
    pass


def test_cross_rank_sums_are_built_on_the_engine_device(monkeypatch):
    """NCCL reduces only CUDA tensors: the tensors handed to all_reduce must live on the device the run
    uses. There is no GPU here, so the "meta" device stands in for it and all_reduce only records."""
    import torch
    import torch.distributed as torch_dist

    devices = []

    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(torch_dist, "all_reduce", all_reduce)
    meta = torch.device("meta")
    with pytest.raises(_Reduced):
        run_dist.rank_report(np.zeros(5, dtype=np.int32), 1.0, world_size=2, device=meta)
    with pytest.raises(_Reduced):
        run_dist.sum_over_ranks([1.0, 2, 3], dtype=torch.float64, device=meta, world_size=2)
    assert devices == [meta, meta]
    totals = run_dist.sum_over_ranks([1.5, 2, 3], dtype=torch.float64, device="cpu", world_size=1)
    assert totals.tolist() == [1.5, 2.0, 3.0]


class _PlainEngine:
    """The slice of a DeepSpeed engine that evaluation.evaluate uses, over a bare HF model with its loss."""

    def __init__(self, model, task="clm"):
        self.module, self.device = LMLoss(model, task).train(model.training), "cpu"

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()

    def __call__(self, **batch):
        return self.module(**batch)


def _tiny_gpt(vocab_size, seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=vocab_size, n_positions=64)).eval()


def _tiny_roberta(vocab_size, seed=0):
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    return RobertaForMaskedLM(RobertaConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64,
                                            intermediate_size=128, vocab_size=vocab_size, pad_token_id=1,
                                            max_position_embeddings=34)).eval()


@pytest.mark.parametrize("task, attn", [("clm", "sdpa"), ("clm", "eager"), ("mlm", "sdpa"), ("mlm", "eager")])
def test_packed_documents_do_not_attend_to_each_other(task, attn):
    """Three documents best-fit into one block with padding: each document's logits must equal those of
    the document run alone (positions from the model's start), so no document sees another."""
    import torch

    from fastlm import pack_documents

    model = _tiny_gpt(50) if task == "clm" else _tiny_roberta(50)
    model.set_attn_implementation(attn)
    offset = model_lib.position_offset(model.config)
    rng = np.random.default_rng(0)
    lengths = [9, 5, 7]
    tokens = rng.integers(3, 50, sum(lengths)).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    packed = pack_documents(tokens, offsets, 24, pad_id=1)
    assert len(packed) == 1  # 21 tokens and 3 pads in one block
    batch = {k: torch.from_numpy(v) for k, v in packed.gather(np.arange(1)).items()}
    batch["position_ids"] += offset
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**model_lib.model_inputs(batch, model.config, task=task, dtype=model.dtype)).logits[0]
        starts = np.flatnonzero(batch["position_ids"][0].numpy() == offset)
        for doc, length in enumerate(lengths):
            (start,) = [s for s in starts if np.array_equal(batch["input_ids"][0, s:s + length].numpy(),
                                                             tokens[offsets[doc]:offsets[doc + 1]])]
            alone = model(input_ids=batch["input_ids"][:, start:start + length],
                          position_ids=torch.arange(length)[None] + offset).logits[0]
            torch.testing.assert_close(logits[start:start + length], alone, rtol=1e-4, atol=1e-5)


class _Killed(BaseException):
    pass


def test_the_model_is_saved_at_the_output_dir_and_never_half_replaced(gpt2_tok, tmp_path, monkeypatch):
    """The model and tokenizer land in output_dir itself (from_pretrained(output_dir), as after run_clm.py),
    beside the run's other files. A kill while the new files move in leaves no config.json: from_pretrained
    refuses the directory instead of loading old and new weights mixed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastlm.train import outputs

    _tiny_gpt(len(gpt2_tok), seed=1).save_pretrained(tmp_path)  # an earlier run's model
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == outputs.MODEL_CONFIG:
            raise _Killed
        real_replace(src, dst)

    engine = _PlainEngine(_tiny_gpt(len(gpt2_tok)))
    engine.zero_optimization_partition_weights = lambda: False
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        model_lib.save_model(engine, gpt2_tok, tmp_path, rank=0)
    monkeypatch.undo()
    assert not (tmp_path / "config.json").exists()
    with pytest.raises((OSError, ValueError), match="config.json|model_type"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model_lib.save_model(engine, gpt2_tok, tmp_path, rank=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == gpt2_tok.get_vocab()
    for name, tensor in model.state_dict().items():
        assert tensor.equal(engine.module.model.state_dict()[name]), name
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n" and not (tmp_path / ".tmp-model").exists()


def test_evaluation_weights_ragged_batches_by_tokens(clm_stores):
    """Documents packed whole leave blocks with different target counts: the result must equal the
    per-token mean over all blocks, not the mean of batch means."""
    import torch

    from fastlm import pack_documents
    from fastlm.store import TokenStore

    store = TokenStore.open(clm_stores[1])
    blocks = pack_documents(store.tokens, store.offsets[:41], 64)  # 40 documents
    model = _tiny_gpt(store.meta["vocab_size"])
    cfg = _config("--per_device_eval_batch_size", "3", "--block_size", "64")
    got = evaluation.evaluate(_PlainEngine(model), blocks, **_eval_args(cfg), rank=0, world_size=1)

    nll_sum, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for lo in range(0, len(blocks), 3):
            batch = {k: torch.from_numpy(v) for k, v in blocks.gather(np.arange(lo, min(lo + 3, len(blocks)))).items()}
            labels, _ = batch.pop("labels"), batch.pop("attention_mask")
            # Documents apart: position_ids restarting, no mask (test_packed_documents_do_not_attend_to_each_other)
            logp = torch.log_softmax(model(**batch, use_cache=False).logits[:, :-1].double(), -1)
            targets = labels[:, 1:]
            keep = targets != -100
            token_nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
            nll_sum += float(token_nll.sum())
            count += int(keep.sum())
            batch_means.append(float(token_nll.mean()))
    assert got["eval_tokens"] == count
    assert got["eval_loss"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert abs(np.mean(batch_means) - nll_sum / count) > 1e-4  # the data really is ragged


def test_evaluation_shows_progress_on_rank_0_unless_disabled(clm_stores, capsys, monkeypatch):
    """A long evaluation shows a bar of its batches, as training shows its steps (--disable_tqdm: none)."""
    from fastlm import pack_blocks
    from fastlm.store import TokenStore

    monkeypatch.setattr(run_dist, "sum_in_place", lambda tensor: tensor)  # one process, no process group
    store = TokenStore.open(clm_stores[1])
    sets = [data.EvalSet("valid", pack_blocks(store.tokens, store.offsets[:31], 64), int(store.offsets[30]))]
    engine = _PlainEngine(_tiny_gpt(store.meta["vocab_size"]))
    n_batches = -(-len(sets[0].blocks) // 8)
    shown = evaluation.evaluate_sets(engine, sets, task="clm", batch_size=8, rank=0, world_size=1, progress=True)
    err = capsys.readouterr().err
    assert n_batches > 2 and "eval valid:" in err and f"/{n_batches} [" in err
    quiet = evaluation.evaluate_sets(engine, sets, task="clm", batch_size=8, rank=0, world_size=1, progress=False)
    assert quiet == shown and "eval valid" not in capsys.readouterr().err
    evaluation.evaluate_sets(engine, sets, task="clm", batch_size=8, rank=1, world_size=1, progress=True)
    assert "eval valid" not in capsys.readouterr().err  # rank 0 only


def test_evaluation_without_targets_reports_nan_perplexity():
    """One-token documents packed whole hold no CLM target (each document's first token is never one)."""
    from fastlm import pack_documents

    blocks = pack_documents(np.arange(3, 13, dtype=np.int32), np.arange(11, dtype=np.int64), 4)
    cfg = _config("--block_size", "4")
    got = evaluation.evaluate(_PlainEngine(_tiny_gpt(16)), blocks, **_eval_args(cfg), rank=0, world_size=1)
    assert got["eval_tokens"] == 0 and math.isnan(got["eval_loss"]) and math.isnan(got["perplexity"])


def test_strided_evaluation_matches_the_hf_sliding_window_recipe(clm_stores):
    import torch

    from fastlm import pack_blocks
    from fastlm.store import TokenStore

    store = TokenStore.open(clm_stores[1])
    tokens, offsets = store.tokens[:1000], np.array([0, 1000])
    model = _tiny_gpt(store.meta["vocab_size"])
    cfg = _config("--block_size", "64", "--eval_stride", "16", "--per_device_eval_batch_size", "4")
    blocks = pack_blocks(tokens, offsets, 64, stride=16, remainder="pad", pad_id=0)
    got = evaluation.evaluate(_PlainEngine(model), blocks, **_eval_args(cfg), rank=0, world_size=1)

    # HF's "Perplexity of fixed-length models" loop, with token-weighted sums.
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
    nll_sum, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], 16):
            end = min(begin + 64, ids.shape[1])
            target = ids[:, begin:end].clone()
            target[:, : -(end - prev_end)] = -100
            nll, n = _token_nll(model(ids[:, begin:end]).logits, target, shift=True)
            nll_sum, count, prev_end = nll_sum + float(nll), count + int(n), end
            if end == ids.shape[1]:
                break
    assert got["eval_tokens"] == count == 999
    assert got["eval_loss"] == pytest.approx(nll_sum / count, rel=1e-6)


# --- training runs ------------------------------------------------------------------------------------

def test_clm_run_learns_and_writes_its_outputs(clm_run):
    out, results = clm_run
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    records = _metrics(out)
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens_seen"} <= set(records[0])
    # The rate each step took, as Trainer logs it: warmup starts at 0 and reaches the peak at step 4.
    assert [m["lr"] for m in records if "loss" in m][:5] == pytest.approx([0.0, 1e-3, 2e-3, 3e-3, 3e-3 * 26 / 27])
    evals = [m for m in records if "perplexity" in m]
    assert [m["step"] for m in evals] == [15, 30]
    assert results["perplexity"] == evals[-1]["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["tokens_seen"] == 30 * 8 * 64 and results["steps"] == 30
    saved = json.loads((out / "results.json").read_text())
    assert saved["perplexity"] == results["perplexity"] and saved["wall_time_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == [
        "checkpoint-15", "checkpoint-30"]


def test_checkpoints_are_in_trainers_layout_and_load_with_from_pretrained(clm_run):
    """checkpoint-N/ as Trainer with DeepSpeed leaves it: the model and tokenizer (from_pretrained), the
    trainer_state.json of that step, DeepSpeed's state in global_stepN/ named by DeepSpeed's `latest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = clm_run
    checkpoint = out / "checkpoint-15"
    assert (checkpoint / "latest").read_text() == "global_step15"
    assert (checkpoint / "global_step15" / "mp_rank_00_model_states.pt").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 15 and [e["step"] for e in state["log_history"]][-2:] == [15, 15]
    saved = json.loads((checkpoint / checkpoints.CHECKPOINT_SETTINGS).read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "latest",
            "global_step15/mp_rank_00_model_states.pt"} <= set(saved)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = AutoTokenizer.from_pretrained(checkpoint)("The game", return_tensors="pt")["input_ids"]
    module = torch.load(checkpoint / "global_step15" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.equal(model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                       module["transformer.h.0.attn.c_attn.weight"])
    assert model(ids).logits.isfinite().all()


def test_saved_model_loads_and_matches_trainer_perplexity(clm_run, clm_stores, tmp_path):
    """Our token-weighted perplexity == transformers.Trainer.evaluate's exp(eval_loss) on the same model
    and blocks. Full CLM blocks all hold block_size - 1 targets, so Trainer's mean of batch means is
    token-weighted too and the two must agree."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from fastlm import pack_blocks
    from fastlm.store import TokenStore

    out, results = clm_run
    model = AutoModelForCausalLM.from_pretrained(out)
    store = TokenStore.open(clm_stores[1])
    blocks = pack_blocks(store.tokens, store.offsets, 64)
    rows = blocks.gather(np.arange(len(blocks)))
    # Position 0 is never a CLM target (the loss shifts). Trainer 5.24 divides by the count of labels
    # != -100 *unshifted* when the model's class name does not map to ForCausalLM (GPT2LMHeadModel), so
    # it over-counts one token per row unless position 0 says -100; the loss itself is unchanged.
    rows["labels"][:, 0] = -100
    dataset = [{k: torch.from_numpy(v[i]) for k, v in rows.items()} for i in range(len(blocks))]
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2,
                                                          report_to=[], use_cpu=True), eval_dataset=dataset)
    hf = trainer.evaluate()
    assert results["eval_tokens"] == len(blocks) * 63
    assert results["perplexity"] == pytest.approx(math.exp(hf["eval_loss"]), rel=1e-4)


def test_resume_continues_exactly(clm_run, clm_stores, tmp_path):
    """Restart from the step-15 checkpoint of the 30-step run: steps 16..30 must repeat its losses."""
    out, _ = clm_run
    _resume_from(out, 15, tmp_path)
    shutil.copy(out / "metrics.jsonl", tmp_path / "metrics.jsonl")
    resumed = run.train(_clm_args(clm_stores, tmp_path, "--max_steps", "30", "--warmup_steps", "3",
                                 "--save_steps", "15", "--eval_steps", "15", "--resume"))
    full, again = _train_losses(out), _train_losses(tmp_path)
    assert sorted(again) == list(range(1, 31))
    for step in range(16, 31):
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=0), step
    assert resumed["tokens_seen"] == 30 * 8 * 64
    assert resumed["perplexity"] == pytest.approx(json.loads((out / "results.json").read_text())["perplexity"], rel=1e-6)


@contextlib.contextmanager
def _deadline(seconds):
    """Turn a hang into a failure: SIGALRM interrupts the main thread after `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _resume_from(source, step, out):
    shutil.copytree(Path(source) / f"checkpoint-{step}", Path(out) / f"checkpoint-{step}")


def test_resume_with_another_global_batch_continues_at_the_same_sample_position(clm_run, clm_stores, tmp_path, capsys):
    """The step-15 checkpoint of the micro batch 8 run sits at sample position 120 of epoch 0; with micro
    batch 16 the run continues from there in steps of 16 samples, and says so."""
    out, _ = clm_run
    _resume_from(out, 15, tmp_path)
    _resume_from(out, 30, tmp_path)  # --resume_from_checkpoint names the earlier one: HF's form
    argv = _clm_args(clm_stores, tmp_path, "--max_steps", "18", "--warmup_steps", "3", "--resume_from_checkpoint",
                     str(tmp_path / "checkpoint-15"))
    argv[argv.index("--per_device_train_batch_size") + 1] = "16"
    with _deadline(120):
        results = run.train(argv)
    captured = capsys.readouterr()
    assert "the global batch changed from 8 (8 x 1 x 1, micro x accumulation x ranks) to 16" in captured.out
    assert f"checkpoint-30 in {tmp_path} come after checkpoint-15" in captured.err
    assert results["tokens_seen"] == (15 * 8 + 3 * 16) * 64
    assert results["ranks"]["blocks_trained"] == 3 * 16  # this run's samples: positions 120..167, no repeats


@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "1e-3", "--learning_rate 0.003 -> 0.001"),
    ("--seed", "4", "--seed 3 -> 4"),
    ("--block_size", "32", "other data"),
])
def test_resume_with_other_settings_or_data_is_a_clear_error(clm_run, clm_stores, tmp_path, capsys, flag, value, message):
    out, _ = clm_run
    _resume_from(out, 15, tmp_path)
    argv = _clm_args(clm_stores, tmp_path, "--max_steps", "30", "--warmup_steps", "3", "--resume")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with _deadline(120), pytest.raises(SystemExit) as exit_:
        run.train(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_step_trains_on_the_same_samples_with_the_same_masks_whatever_its_split(mlm_stores, roberta_tok):
    """Global batch 16 as 16 x 1 x 1, 8 x 2 x 1, 4 x 2 x 2 and 1 x 4 x 4 (micro x accumulation x ranks):
    every optimizer step gets the same rows, masks included, so only the summation order differs."""
    from fastlm import pack_blocks
    from fastlm.train.sampling import TrainBatches
    from fastlm.store import TokenStore

    store = TokenStore.open(mlm_stores[0])
    blocks = pack_blocks(store.tokens, store.offsets, 64)
    masker = _masker(roberta_tok)

    def steps(micro, accum, world, start=0):
        shares = [TrainBatches(blocks, micro_batch=micro, accumulation=accum, rank=r, world_size=world, epoch=2,
                               seed=3, start=start, masker=masker) for r in range(world)]
        by_step = []
        for k in range(len(shares[0]) // accum):
            rows = [tuple(ids) + tuple(labels) for share in shares for j in range(k * accum, (k + 1) * accum)
                    for ids, labels in zip(share[j]["input_ids"], share[j]["labels"])]
            by_step.append(sorted(rows))
        return by_step

    reference = steps(16, 1, 1)
    assert len(reference) == len(blocks) // 16 >= 3
    for layout in [(8, 2, 1), (4, 2, 2), (1, 4, 4)]:
        assert steps(*layout) == reference, layout
    # Resumed at sample position 48 (after 3 steps of 16) with steps of 8: the same samples, none twice.
    rows = [row for step in steps(8, 1, 1, start=48) for row in step]
    assert len(rows) == (len(blocks) - 48) // 8 * 8
    later = [row for step in reference[3:] for row in step]
    assert sorted(rows[: len(later)]) == sorted(later)
    continued = TrainBatches(blocks, micro_batch=8, accumulation=1, rank=0, world_size=1, epoch=2, seed=3, start=48)
    covered = np.concatenate([continued.positions(j) for j in range(len(continued))])
    assert np.array_equal(covered, np.arange(48, 48 + len(covered)))


@pytest.fixture(scope="module")
def dropout_free(tmp_path_factory):
    """Config directories of tiny models without dropout: runs that split the same steps differently
    must then agree."""
    from transformers import GPT2Config, RobertaConfig

    root = tmp_path_factory.mktemp("dropout_free_configs")
    GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1024, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0).save_pretrained(root / "gpt2")
    RobertaConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256, vocab_size=50265,
                  max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(root / "roberta")
    return {"clm": root / "gpt2", "mlm": root / "roberta"}


def _layout(argv, micro, accum):
    """argv with another micro batch and accumulation."""
    argv = [*argv, "--gradient_accumulation_steps", str(accum)]
    argv[argv.index("--per_device_train_batch_size") + 1] = str(micro)
    return argv


@pytest.fixture(scope="module")
def dropout_free_run(clm_stores, dropout_free, tmp_path_factory):
    """8 steps of global batch 16 (micro 8 x accumulation 2, ZeRO-2), checkpoint at step 4, no dropout:
    the run that resumes on other layouts must repeat its losses."""
    root = tmp_path_factory.mktemp("dropout_free")

    def argv(out, micro, accum, *extra):
        args = _clm_args(clm_stores, out, "--max_steps", "8", "--save_steps", "4", "--zero_stage", "2", *extra)
        args[args.index("--config_name") + 1] = str(dropout_free["clm"])
        return _layout(args, micro, accum)
    run.train(argv(root / "full", 8, 2))
    return root / "full", argv


def _weights(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "model.safetensors")


def _relative_distance(a, b):
    assert a.keys() == b.keys()
    squared = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    return math.sqrt(squared / sum(float(a[k].double().square().sum()) for k in a))


def _assert_same_training(a, b, steps):
    """Runs a and b logged the same token-weighted loss at `steps` and ended with the same weights."""
    losses_a, losses_b = _train_losses(a), _train_losses(b)
    assert sorted(losses_b) == steps
    for step in steps:
        assert losses_b[step] == pytest.approx(losses_a[step], rel=2e-5, abs=0), step
    assert _relative_distance(_weights(a), _weights(b)) < 1e-4


def test_steps_are_token_weighted_whatever_the_accumulation_clm_documents(clm_stores, dropout_free, tmp_path):
    """Whole documents packed into blocks leave micro batches with different target counts: the same
    blocks as micro batch 8 x accumulation 1 and as 2 x 4 must still take the same steps (the gradient of
    summed token NLL / the step's targets; ZeRO-0 fp32, where the loop clips itself)."""
    def argv(out, micro, accum):
        args = _clm_args(clm_stores, out, "--packing", "documents", "--max_steps", "3")
        args[args.index("--config_name") + 1] = str(dropout_free["clm"])
        return _layout(args, micro, accum)

    run.train(argv(tmp_path / "8x1", 8, 1))
    run.train(argv(tmp_path / "2x4", 2, 4))
    _assert_same_training(tmp_path / "8x1", tmp_path / "2x4", [1, 2, 3])


@pytest.fixture(scope="module")
def mlm_dropout_free_run(mlm_stores, dropout_free, tmp_path_factory):
    """4 MLM steps of micro batch 8 (ZeRO-2, DeepSpeed clips), checkpoint at step 2, no dropout. Masks
    give every row its own number of targets."""
    root = tmp_path_factory.mktemp("mlm_dropout_free")

    def argv(out, micro, accum, *extra):
        args = ["--task", "mlm", "--train_store", str(mlm_stores[0]), "--eval_store", str(mlm_stores[1]),
                "--config_name", str(dropout_free["mlm"]), "--block_size", "64", "--per_device_train_batch_size", "8",
                "--learning_rate", "3e-3", "--max_steps", "4", "--save_steps", "2", "--zero_stage", "2",
                "--output_dir", str(out), *TINY, *extra]
        return _layout(args, micro, accum)
    run.train(argv(root / "full", 8, 1))
    return root / "full", argv


def test_mlm_resumed_with_another_split_takes_the_same_token_weighted_steps(mlm_dropout_free_run, tmp_path, capsys):
    """The step-2 checkpoint of the 8 x 1 run resumed as micro batch 2 x accumulation 4: the same samples
    and masks (elastic resume), and steps 3-4 as the uninterrupted run took them (token weighting)."""
    full, argv = mlm_dropout_free_run
    _resume_from(full, 2, tmp_path)
    run.train(argv(tmp_path, 2, 4, "--resume"))
    assert "the same global batch of 8, so the same samples in the same order" in capsys.readouterr().out
    _assert_same_training(full, tmp_path, [3, 4])


def _launch_two_ranks(argv, *, cwd, launcher="deepspeed"):
    """`deepspeed --num_gpus 2 fastlm/run.py argv`, or `torchrun --nproc_per_node 2 ...` (as a script, fastlm
    not on PYTHONPATH); asserts exit 0. Tests of what two ranks compute take torchrun: DeepSpeed's launcher
    is two more processes importing DeepSpeed (~12 s of CPU a launch), and test_launch covers it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores: the launcher leaves it unset, ~10x slower
    ranks = {"deepspeed": "--num_gpus", "torchrun": "--nproc_per_node"}[launcher]
    cmd = [str(Path(sys.executable).with_name(launcher)), ranks, "2", "--master_port", str(run_dist.free_port()),
           str(ROOT / "fastlm" / "run.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_mlm_resumed_on_two_ranks_takes_the_same_token_weighted_steps(mlm_dropout_free_run, tmp_path):
    """The 1-rank ZeRO-2 checkpoint resumed on 2 ranks as micro batch 4 x 2 ranks: each rank's micro batch
    holds its own number of masked targets, and steps 3-4 must still be the 1-rank run's (DeepSpeed's
    average over ranks undone)."""
    full, argv = mlm_dropout_free_run
    _resume_from(full, 2, tmp_path)
    _launch_two_ranks(argv(tmp_path, 4, 1, "--resume"), cwd=tmp_path, launcher="torchrun")
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 2
    _assert_same_training(full, tmp_path, [3, 4])


def test_resume_with_another_split_of_the_global_batch_repeats_the_losses(dropout_free_run, tmp_path, capsys):
    full, argv = dropout_free_run
    _resume_from(full, 4, tmp_path)
    run.train(argv(tmp_path, 4, 4, "--resume"))
    assert "the same global batch of 16, so the same samples in the same order" in capsys.readouterr().out
    a, b = _train_losses(full), _train_losses(tmp_path)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=2e-5, abs=0), step


def test_resume_on_another_rank_count_repeats_the_losses(dropout_free_run, tmp_path):
    """A 1-rank ZeRO-2 checkpoint resumed on 2 ranks (micro 4 x accumulation 2 x 2 ranks): the optimizer
    state is converted to DeepSpeed's universal format first."""
    full, argv = dropout_free_run
    _resume_from(full, 4, tmp_path)
    proc = _launch_two_ranks(argv(tmp_path, 4, 2, "--resume"), cwd=tmp_path, launcher="torchrun")
    assert "converting" in proc.stdout and "universal format" in proc.stdout
    a, b = _train_losses(full), _train_losses(tmp_path)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=2e-5, abs=0), step
    assert sorted(p.name for p in (tmp_path / "checkpoint-4").iterdir() if "global_step" in p.name) == ["global_step4"]
    assert not (tmp_path / "checkpoint-4" / "latest_universal").exists()
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 2


def test_resume_is_exact_across_an_epoch_boundary_with_accumulation(clm_stores, tmp_path):
    """Training on the small evaluation store, micro batch 16 x 2 accumulation steps: an epoch is about 15
    optimizer steps, so the run resumed at step 12 crosses into two new epochs (new shuffles) and must
    still repeat every loss."""
    small = (clm_stores[1], clm_stores[1])
    argv = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2", "--max_steps", "34",
            "--save_steps", "12", "--max_eval_samples", "64"]
    full = run.train(_clm_args(small, tmp_path / "full", *argv))
    assert full["epochs"] > 2
    resumed_dir = tmp_path / "resumed"
    _resume_from(tmp_path / "full", 12, resumed_dir)
    run.train(_clm_args(small, resumed_dir, *argv, "--resume"))
    a, b = _train_losses(tmp_path / "full"), _train_losses(resumed_dir)
    assert sorted(b) == list(range(13, 35))  # no metrics.jsonl was copied: only the resumed steps
    for step in range(13, 35):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), step


def test_fine_tunes_from_a_save_pretrained_directory(clm_run, clm_stores, tmp_path):
    out, results = clm_run
    args = _clm_args(clm_stores, tmp_path, "--max_steps", "3", "--learning_rate", "1e-4")
    args[args.index("--config_name"):args.index("--config_name") + 2] = ["--model_name_or_path", str(out)]
    tuned = run.train(args)
    first = _train_losses(tmp_path)[1]
    assert first < _train_losses(out)[1] - 1.0  # it started from the trained weights, not from scratch
    assert tuned["perplexity"] < results["perplexity"] * 1.05


def test_embeddings_grow_to_the_tokenizer(clm_stores, tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_gpt(1000).save_pretrained(tmp_path / "small_vocab")  # the store's tokenizer has 1024 ids
    args = _clm_args(clm_stores, tmp_path / "out", "--max_steps", "1")
    args[args.index("--config_name"):args.index("--config_name") + 2] = ["--model_name_or_path", str(tmp_path / "small_vocab")]
    from fastlm.cli import main as fastlm_command

    assert fastlm_command(["train", *args]) == 0  # `fastlm train ...` exits 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").get_input_embeddings().num_embeddings == 1024


@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_zero_stages_train(stage, precision, clm_stores, tmp_path):
    results = run.train(_clm_args(clm_stores, tmp_path, "--max_steps", "4", "--zero_stage", str(stage),
                                 "--precision", precision, "--learning_rate", "1e-2", "--max_eval_samples", "64"))
    losses = _train_losses(tmp_path)
    # A fresh model's loss is about ln(vocab): ZeRO-3 must not skip HF's weight init (it would be ~40).
    assert abs(losses[1] - math.log(1024)) < 1.0
    assert losses[4] < losses[1]
    assert results["zero_stage"] == stage and results["precision"] == precision
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(p.abs().sum() > 0 for p in model.parameters())  # ZeRO-3 gathered real weights


def test_mlm_run_learns_and_matches_trainer_with_the_same_fixed_masks(mlm_stores, tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments

    from fastlm import pack_blocks
    from fastlm.train.sampling import eval_batches
    from fastlm.store import TokenStore

    results = run.train(["--task", "mlm", "--train_store", str(mlm_stores[0]), "--eval_store", str(mlm_stores[1]),
                        "--config_name", "roberta-tiny", "--block_size", "64", "--per_device_train_batch_size", "8",
                        "--learning_rate", "5e-3", "--max_steps", "12", "--output_dir", str(tmp_path), *TINY,
                        "--dataloader_num_workers", "1"])  # masks drawn in a DataLoader worker
    losses = _train_losses(tmp_path)
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.5

    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    store = TokenStore.open(mlm_stores[1])
    blocks = pack_blocks(store.tokens, store.offsets, 64)
    masker = _masker(tokenizer)
    # One batch holding every block: Trainer's batch mean is then the token-weighted mean.
    (batch, _), = eval_batches(blocks, batch_size=len(blocks), rank=0, world_size=1, masker=masker)
    dataset = [{k: torch.from_numpy(v[i]) for k, v in batch.items()} for i in range(len(blocks))]
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True,
                                                          per_device_eval_batch_size=len(blocks)), eval_dataset=dataset)
    hf = trainer.evaluate()
    assert results["eval_tokens"] == int((batch["labels"] != -100).sum())
    assert results["perplexity"] == pytest.approx(math.exp(hf["eval_loss"]), rel=1e-4)


def test_packed_documents_feed_roberta_its_own_position_numbering(mlm_stores, tmp_path, monkeypatch):
    """pack_documents restarts position_ids at 0 per document; RoBERTa numbers positions from
    padding_idx + 1, so the runner must shift them (else every document would start on the padding slot).
    Checked on what the model really receives, in training and evaluation."""
    seen = []
    build_model = run_main.build_model

    def recording_build_model(*args, **kwargs):
        model, keep_alive = build_model(*args, **kwargs)
        # The base model: the loss (heads.LMLoss) runs it, then the MLM head only where labels are.
        model.base_model.register_forward_pre_hook(lambda module, _, inputs: seen.append(
            (module.training, inputs["position_ids"].clone(), inputs["attention_mask"].clone())), with_kwargs=True)
        return model, keep_alive

    monkeypatch.setattr(run_main, "build_model", recording_build_model)
    results = run.train(["--task", "mlm", "--train_store", str(mlm_stores[0]), "--eval_store", str(mlm_stores[1]),
                         "--config_name", "roberta-tiny", "--block_size", "64", "--packing", "documents",
                         "--max_steps", "2", "--output_dir", str(tmp_path), *TINY])
    assert math.isfinite(results["perplexity"])
    assert [training for training, *_ in seen].count(True) == 2 and not seen[-1][0]  # 2 steps, then evaluation
    pad_id = 1  # RoBERTa's <pad>
    shared_rows = []
    for _, position_ids, attention_mask in seen:
        assert position_ids[:, 0].tolist() == [pad_id + 1] * len(position_ids)
        assert int(position_ids.min()) == pad_id + 1
        # Rows holding more than one document (or padding, which also sits at padding_idx + 1) get a
        # 4-D block-diagonal mask; rows that are one whole document each keep the plain mask.
        shared_rows.append(int((position_ids == pad_id + 1).sum()) > len(position_ids))
        assert attention_mask.ndim == (4 if shared_rows[-1] else 2)
    assert any(shared_rows)


def test_train_batches_are_disjoint_across_ranks_and_deterministic(clm_stores):
    from fastlm import pack_blocks
    from fastlm.train.sampling import TrainBatches
    from fastlm.store import TokenStore

    store = TokenStore.open(clm_stores[0])
    blocks = pack_blocks(store.tokens, store.offsets, 64)
    shares = [TrainBatches(blocks, micro_batch=4, accumulation=2, rank=r, world_size=3, epoch=1, seed=0)
              for r in range(3)]
    seen = [np.concatenate([s.indices(j) for j in range(len(s))]) for s in shares]
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)  # disjoint, no repeats
    assert len(shares[0]) % 2 == 0 and len(everything) > 0.9 * len(blocks)
    again = TrainBatches(blocks, micro_batch=4, accumulation=2, rank=1, world_size=3, epoch=1, seed=0)
    assert np.array_equal(again[5]["input_ids"], shares[1][5]["input_ids"])
    other_epoch = TrainBatches(blocks, micro_batch=4, accumulation=2, rank=1, world_size=3, epoch=2, seed=0)
    assert not np.array_equal(other_epoch.indices(0), shares[1].indices(0))


def test_demo_arguments_prepare_a_corpus_every_machine_has(tmp_path):
    results = run.train([*demo.demo_argv(tmp_path, max_steps=3), "--disable_tqdm"])
    from pydoc_data.topics import topics

    assert len((tmp_path / "pydoc_topics.txt").read_text(encoding="utf-8").splitlines()) == len(topics)
    assert results["steps"] == 3 and math.isfinite(results["perplexity"])


def test_dataset_with_document_packing_and_strided_evaluation(text_files, tmp_path):
    """--dataset_name (a save_to_disk directory here: the offline stand-in for a hub name) is prepared
    once into the cache; strided evaluation scores every evaluation token but the first exactly once."""
    from datasets import Dataset, DatasetDict

    from fastlm.store import TokenStore

    train, valid = (p.read_text(encoding="utf-8").splitlines()[:300] for p in text_files)
    DatasetDict({"train": Dataset.from_dict({"text": train}), "validation": Dataset.from_dict({"text": valid[:40]})}
                ).save_to_disk(tmp_path / "wiki")
    argv = ["--dataset_name", str(tmp_path / "wiki"), "--train_tokenizer", "--vocab_size", "512",
            "--config_name", "gpt2-tiny", "--block_size", "64", "--packing", "documents", "--eval_stride", "32",
            "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *TINY]
    results = run.train(argv)
    (cache,) = (p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    eval_store = TokenStore.open(cache / "validation")
    assert results["eval_tokens"] == eval_store.tokens.shape[0] - 1
    assert results["steps"] == 2 and math.isfinite(results["perplexity"])
    stamp = (cache / "train" / "tokens.bin").stat().st_mtime_ns
    run.train(argv)  # a second run reuses the prepared stores
    assert (cache / "train" / "tokens.bin").stat().st_mtime_ns == stamp


def test_two_ranks_with_the_deepspeed_launcher(text_files, tmp_path):
    """`deepspeed --num_gpus 2 fastlm/run.py` (as a script, fastlm not installed): rank 0 prepares the
    text while rank 1 waits, the ranks train on disjoint blocks and both report the same evaluation."""
    _launch_two_ranks(["--train_file", str(text_files[0]), "--validation_file", str(text_files[1]), "--train_tokenizer",
                       "--vocab_size", "512", "--config_name", "gpt2-tiny", "--block_size", "64", "--max_steps", "4",
                       "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), *TINY], cwd=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["ranks"]["overlapping_blocks"] == 0
    assert results["ranks"]["blocks_trained"] == 4 * 4 * 2
    assert len(set(results["ranks"]["eval_loss"])) == 1 and len(results["ranks"]["eval_loss"]) == 2
    assert results["tokens_seen"] == 4 * 4 * 2 * 64


def test_torchrun_prints_a_refusal_once(tmp_path):
    """Under `torchrun --nproc_per_node 2` every rank parses the command line: the error and the usage are
    printed once (rank 0), and every rank exits with status 2. torchrun's own ChildFailedError block follows
    (it reports any non-zero exit; the runner cannot stop that). Rank 1 leaves through errors.fail, as
    every rank does for a ConfigError (rank 0's line from it is checked by the in-process refusals)."""
    bad, message = ["--no_such_flag"], "fastlm train: error: unrecognized arguments: --no_such_flag"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
           str(run_dist.free_port()), str(ROOT / "fastlm" / "run.py"), "--train_store", "s", "--config_name", "gpt2-tiny",
           "--output_dir", str(tmp_path), *bad]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in output
    assert output.count("fastlm train: error:") == 1 and message in output, output[-3000:]
    assert output.count("usage: fastlm train") == 1


# --- divergence and damaged checkpoints ---------------------------------------------------------------

def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(clm_stores, tmp_path, capsys):
    """A learning rate of 1e6 makes the loss NaN at step 2: the run stops there with exit status 1 and one
    line, step 1's checkpoint (which verifies) is still the newest, and no model or results are written."""
    argv = _clm_args(clm_stores, tmp_path, "--learning_rate", "1e6", "--max_steps", "6", "--save_steps", "1")
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert "fastlm train: error: training diverged at step 2: loss nan" in err and "Traceback" not in err
    assert f"{tmp_path / 'checkpoint-1'} is still the newest checkpoint" in err
    assert [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]
    checkpoints.verify_checkpoint(tmp_path / "checkpoint-1",
                                  json.loads((tmp_path / "checkpoint-1" / checkpoints.CHECKPOINT_SETTINGS).read_text())["files"])
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "results.json").exists()


_LIMITED_SAVE = """
import resource, signal, sys
from fastlm.train import checkpoints, main

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as under `ulimit -f`: a write past the limit fails with EFBIG


def limit_files():  # to 200 kB
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


save_checkpoint, save_model = checkpoints.save_checkpoint, main.save_model

def save_checkpoint_under_a_limit(engine, output_dir, step, *args, **kwargs):
    if step == 4:  # the first checkpoint is written, the second meets the limit
        limit_files()
    return save_checkpoint(engine, output_dir, step, *args, **kwargs)

def save_model_under_a_limit(*args, **kwargs):
    limit_files()
    return save_model(*args, **kwargs)

checkpoints.save_checkpoint = save_checkpoint_under_a_limit
main.save_model = save_model_under_a_limit
sys.exit(main.main(sys.argv[1:]))
"""


def _save_under_a_file_size_limit(argv):
    # A run of its own: not the rendezvous of this process's in-process runs (RANK, MASTER_PORT, ...)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _LIMITED_SAVE, *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_one(clm_stores, tmp_path):
    """A file-size limit (or a full disk) met while checkpoint-4 is written: one line naming the file and
    the errno, exit status 1, no traceback; nothing of checkpoint-4 is left and checkpoint-2 still verifies."""
    error = _save_under_a_file_size_limit(_clm_args(clm_stores, tmp_path, "--max_steps", "6", "--save_steps", "2"))
    assert error.startswith(f"fastlm train: error: step 4: cannot save checkpoint {tmp_path / 'checkpoint-4'}: "
                            f"{tmp_path / '.tmp-checkpoint-4' / 'global_step4'}")
    assert "[Errno 27] File too large" in error
    assert f"{tmp_path / 'checkpoint-2'} is still the newest checkpoint" in error
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    checkpoints.verify_checkpoint(tmp_path / "checkpoint-2",
                                  json.loads((tmp_path / "checkpoint-2" / checkpoints.CHECKPOINT_SETTINGS).read_text())["files"])


def test_a_final_model_that_cannot_be_written_is_one_line(clm_stores, tmp_path):
    error = _save_under_a_file_size_limit(_clm_args(clm_stores, tmp_path, "--max_steps", "2"))
    assert error == (f"fastlm train: error: step 2: cannot save the model in {tmp_path}: "
                     f"{tmp_path / '.tmp-model' / 'model.safetensors'}: [Errno 27] File too large; the files there are "
                     "as they were")
    assert not (tmp_path / "config.json").exists() and not (tmp_path / ".tmp-model").exists()


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_stops_the_run_at_its_own_step(stage, clm_stores, tmp_path, monkeypatch):
    """The loss of step 3 is finite but one of its gradients is not: the gradient norm (the loop's own on
    ZeRO-0 fp32; on ZeRO-2 DeepSpeed skips the update and reports inf) names step 3, before a checkpoint
    holds its update."""
    build_model = run_main.build_model
    backwards = []

    def poison(grad):  # called once a backward pass (accumulation 1: once a step)
        backwards.append(1)
        return grad * math.nan if len(backwards) == 3 else grad

    def poisoned_build_model(*args, **kwargs):
        model, keep_alive = build_model(*args, **kwargs)
        model.transformer.h[0].mlp.c_fc.bias.register_hook(poison)
        return model, keep_alive

    monkeypatch.setattr(run_main, "build_model", poisoned_build_model)
    argv = _clm_args(clm_stores, tmp_path, "--max_steps", "5", "--save_steps", "2", "--zero_stage", str(stage))
    with pytest.raises(Diverged, match=r"training diverged at step 3: loss \d.*gradient norm (nan|inf)"):
        run.train(argv)
    assert [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]
    assert not (tmp_path / "config.json").exists()


def _flip_a_bit(path):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _truncate(path):
    os.truncate(path, path.stat().st_size - 100)


@pytest.mark.parametrize("damage, message", [
    (lambda step: _flip_a_bit(step / "global_step15" / "mp_rank_00_model_states.pt"),
     "mp_rank_00_model_states.pt is corrupt"),
    (lambda step: _truncate(step / "global_step15" / "mp_rank_00_model_states.pt"),
     "mp_rank_00_model_states.pt is truncated"),
    (lambda step: (step / "global_step15" / "mp_rank_00_model_states.pt").unlink(),
     "mp_rank_00_model_states.pt is missing"),
    (lambda step: _flip_a_bit(step / "model.safetensors"), "model.safetensors is corrupt"),
    (lambda step: (step / checkpoints.CHECKPOINT_SETTINGS).unlink(), "fastlm.json is missing"),
    (lambda step: (step / "latest").write_text("global_step99"), "names 'global_step99', which is not a directory"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(damage, message, clm_run, clm_stores, tmp_path, capsys):
    out, _ = clm_run
    _resume_from(out, 15, tmp_path)
    damage(tmp_path / "checkpoint-15")
    with _deadline(120), pytest.raises(SystemExit) as exit_:
        run.train(_clm_args(clm_stores, tmp_path, "--max_steps", "30", "--warmup_steps", "3", "--resume"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(clm_run, clm_stores, tmp_path, capsys):
    """A hostile writer plants a pickled os.system call in the model states and updates fastlm.json's size and
    sha256 to match (the checksums catch damage, not a hostile writer): --resume refuses in one line, before
    loading anything, and the command never runs."""
    from fastlm.store import sha256_file
    from tests.test_safe_load import Payload, plant

    out, _ = clm_run
    _resume_from(out, 15, tmp_path)
    step = tmp_path / "checkpoint-15"
    marker = tmp_path / "ran"
    name = "global_step15/mp_rank_00_model_states.pt"
    plant(step / name, Payload("system", marker))
    record = json.loads((step / checkpoints.CHECKPOINT_SETTINGS).read_text())
    record["files"][name] = [(step / name).stat().st_size, sha256_file(step / name)]
    (step / checkpoints.CHECKPOINT_SETTINGS).write_text(json.dumps(record))
    with _deadline(120), pytest.raises(SystemExit) as exit_:
        run.train(_clm_args(clm_stores, tmp_path, "--max_steps", "30", "--warmup_steps", "3", "--resume"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt holds a pickled posix.system: fastlm does not load code from checkpoints" in err
    assert "Traceback" not in err and not marker.exists()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


def test_report_to_mlflow_leaves_a_finished_run_with_a_point_per_logging_step(clm_stores, tmp_path, monkeypatch):
    """The runner drives the tracker: MLFLOW_TRACKING_URI=file:./mlruns leaves a FINISHED run whose loss history
    has one point per logging step under Trainer's names, and the final evaluation beside it."""
    pytest.importorskip("mlflow")  # the trackers extra (installed by the test set-up)
    from mlflow.tracking import MlflowClient

    # An absolute URI: mlflow caches a store by its URI, and tests/test_trackers.py uses "file:./mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for it to use a file store
    run.train(_clm_args(clm_stores, tmp_path / "out", "--max_steps", "6", "--report_to", "mlflow",
                        "--run_name", "tiny", "--logging_steps", "2"))
    client = MlflowClient(tracking_uri=f"file:{tmp_path}/mlruns")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.info.status == "FINISHED" and found.info.run_name == "tiny"
    losses = client.get_metric_history(found.info.run_id, "loss")
    logged = {m["step"]: m["loss"] for m in _metrics(tmp_path / "out") if "loss" in m}
    assert [m.step for m in losses] == sorted(logged) == [2, 4, 6]
    assert [m.value for m in losses] == pytest.approx([logged[step] for step in sorted(logged)])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "eval_loss")] == [6]


def test_torch_compile_compiles_the_transformer_and_says_what_the_first_step_cost(clm_stores, tmp_path, capsys):
    """HF's --torch_compile (refused before): the transformer is compiled in place, so the saved model keeps its
    own parameter names; the first step's time, compiling included, is reported. (The "eager" backend traces
    with Dynamo without generating code: the flag's plumbing, in seconds.)"""
    from transformers import AutoModelForCausalLM

    results = run.train(_clm_args(clm_stores, tmp_path, "--max_steps", "2", "--torch_compile",
                                  "--torch_compile_backend", "eager"))
    assert results["steps"] == 2 and math.isfinite(results["perplexity"])
    assert "--torch_compile: the first step took" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.n_layer == 2


def test_a_megatron_dataset_of_ids_the_kernels_do_not_read_is_one_line_naming_it(tmp_path, capsys):
    """megatron-core writes uint8 datasets; packing them would fail deep in the data plan with a library
    TypeError: the run refuses the store by name before anything starts."""
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = tmp_path / "tiny_text_document"
    builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint8)
    builder.add_document(np.arange(1, 200, dtype=np.uint8), [199])
    builder.finalize(f"{prefix}.idx")
    with pytest.raises(SystemExit) as exit_:
        run.train(["--task", "clm", "--train_store", str(prefix), "--tokenizer_name", str(fixture_path("tokenizers", "gpt2")),
                   "--config_name", "gpt2-tiny", "--block_size", "16", "--max_steps", "1",
                   "--validation_split_percentage", "0", "--output_dir", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"fastlm train: error: --train_store {prefix}: its uint8 token ids are not supported "
                          "(fastlm's packing kernels read uint16, uint32, int32 or int64 ids")


def test_a_megatron_dataset_trains_in_place_with_the_tokenizer_given(clm_stores, tmp_path, capsys):
    """`--train_store PREFIX` of a Megatron-LM indexed dataset (here fastlm's export of the training store, which
    megatron-core reads back in tests/test_megatron.py): opened in place, the tokenizer from --tokenizer_name;
    without one the run says which flag names it. Same data, same steps: the same losses as the store itself."""
    from fastlm.export import export_store
    from fastlm.store import TokenStore

    prefix = tmp_path / "wiki_text_document"
    export_store(clm_stores[0], prefix, format="megatron")
    tokenizer = str(TokenStore.open(clm_stores[0]).tokenizer_dir)
    argv = lambda store, out, *extra: ["--task", "clm", "--train_store", str(store), "--config_name", "gpt2-tiny",  # noqa: E731
                                       "--block_size", "64", "--max_steps", "3", "--validation_split_percentage", "0",
                                       "--output_dir", str(tmp_path / out), *TINY, *extra]
    with pytest.raises(SystemExit) as exit_:
        run.train(argv(prefix, "none"))
    assert exit_.value.code == 2 and "--tokenizer_name" in capsys.readouterr().err
    run.train(argv(prefix, "megatron", "--tokenizer_name", tokenizer))
    run.train(argv(clm_stores[0], "store"))
    assert _train_losses(tmp_path / "megatron") == pytest.approx(_train_losses(tmp_path / "store"), rel=1e-6)
