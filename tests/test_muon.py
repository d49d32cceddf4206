"""--optim muon end to end on CPU: the parameter split, the learning-rate match, and the runner's guarantees
(token-weighted steps, exact and elastic resume, divergence stop, packed documents) with Muon's momentum,
in one process and on 2 ranks under torchrun and the deepspeed launcher."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm import run
from fastlm.train import checkpoints, config, muon
from fastlm.train.errors import ConfigError, Diverged
from fastlm.train.dist import free_port
from tests.test_run import (ROOT, _assert_same_training, _clm_args, _launch_two_ranks, _layout,  # noqa: F401
                            _resume_from, _tiny_gpt, _tiny_roberta, _train_losses, clm_stores, dropout_free, mlm_stores,
                            text_files)

MUON = ["--optim", "muon"]


def _optim(*argv):
    return config.parse(["--train_store", "s", "--config_name", "gpt2-tiny", *MUON, *argv]).optim


def _names(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_gpt2_blocks_matrices_go_to_muon_embeddings_head_norms_and_biases_to_adamw():
    model = _tiny_gpt(1024)
    hidden = _names(model, muon.muon_parameters(model))
    assert hidden == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    groups, summary = muon.param_groups(model, _optim())
    assert "Muon trains 8 matrices" in summary and "AdamW 20 tensors" in summary  # wte, wpe, ln_f x2, 8 a block
    # The tied head is wte: AdamW's, decayed as a matrix; every parameter is in exactly one group.
    everything = [p for group in groups for p in group["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    assert model.lm_head.weight.use_muon is False and model.transformer.h[0].mlp.c_fc.weight.use_muon is True


def test_roberta_head_and_embeddings_stay_with_adamw():
    model = _tiny_roberta(1000)
    hidden = _names(model, muon.muon_parameters(model))
    assert hidden and all(name.startswith("roberta.encoder.layer.") for name in hidden)
    assert not any("LayerNorm" in name or name.endswith("bias") for name in hidden)
    assert "lm_head.dense.weight" not in hidden and "lm_head.decoder.weight" not in hidden


def test_learning_rate_is_matched_to_adamw_as_torch_match_rms_adamw():
    """One DeepSpeed Muon step with the runner's group settings moves a matrix exactly as torch.optim.Muon
    with adjust_lr_fn="match_rms_adamw" and the same learning rate, momentum and weight decay."""
    torch.manual_seed(0)
    for shape in [(64, 192), (256, 64)]:
        weight, grad = torch.randn(shape), torch.randn(shape)
        reference = torch.nn.Parameter(weight.clone())
        reference.grad = grad.clone()
        torch.optim.Muon([reference], lr=0.01, weight_decay=0.1, momentum=0.9,
                         adjust_lr_fn="match_rms_adamw").step()
        ours = torch.nn.Parameter(weight.clone())
        ours.grad = grad.clone()
        scale = muon._match_adamw(shape)
        muon.optimizer([dict(params=[ours], use_muon=True, lr=0.01 * scale, momentum=0.9,
                             weight_decay=0.1 / scale, ns_method="standard")], device_type="cpu").step()
        step_ref, step_ours = reference.detach() - weight, ours.detach() - weight
        # Both Newton-Schulz iterations run in bfloat16 (rounded at different points): the same step to a few
        # of its ulps, the same size to 1% (a wrong scale would be off by sqrt(3) or more here).
        assert float((step_ours - step_ref).norm() / step_ref.norm()) < 0.05, shape
        assert float(step_ours.norm() / step_ref.norm()) == pytest.approx(1, abs=0.01), shape


@pytest.mark.parametrize("argv, message", [
    (["--muon_lr", "1e-3"], "--muon_lr set(s) Muon, which only --optim muon trains with"),
    (MUON + ["--muon_momentum", "1"], "--muon_momentum must be in [0, 1), got 1.0"),
    (MUON + ["--muon_lr", "0"], "--muon_lr must be > 0, got 0.0"),
    (["--optim", "sgd"], "--optim sgd is not supported"),
    (MUON + ["--optim_args", "ns_steps=3"], "with --optim muon also by --muon_lr/--muon_momentum"),
])
def test_bad_muon_settings_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        config.parse(["--train_store", "s", "--config_name", "gpt2-tiny", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_deepspeed_json_optimizer_contradicts_optim_muon(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(SystemExit):
        _optim("--deepspeed", str(path))
    assert "--optim muon builds the optimizer itself" in capsys.readouterr().err


def _muon_args(stores, out, *extra, config_dir=None):
    args = _clm_args(stores, out, *MUON, *extra)
    if config_dir is not None:
        args[args.index("--config_name") + 1] = str(config_dir)
    return args


@pytest.mark.parametrize("stage", [0, 2])
def test_muon_learns_and_says_what_it_trains(stage, clm_stores, tmp_path, capsys):
    results = run.train(_muon_args(clm_stores, tmp_path, "--max_steps", "12", "--zero_stage", str(stage)))
    losses = _train_losses(tmp_path)
    assert losses[12] < losses[1] - 0.5
    assert math.isfinite(results["eval_loss"])
    out = capsys.readouterr().out
    assert out.count("[fastlm] --optim muon: Muon: the 2-D weights inside the transformer blocks") == 1
    assert "Muon trains 8 matrices" in out


@pytest.mark.parametrize("stage", [0, 2])
def test_muon_steps_are_token_weighted_on_packed_documents(stage, clm_stores, dropout_free, tmp_path):
    """Whole documents packed into blocks (micro batches with different target counts): micro batch 8 x
    accumulation 1 and 2 x 4 take the same Muon steps."""
    def argv(out, micro, accum):
        return _layout(_muon_args(clm_stores, out, "--packing", "documents", "--max_steps", "3", "--zero_stage",
                                  str(stage), config_dir=dropout_free["clm"]), micro, accum)

    run.train(argv(tmp_path / "8x1", 8, 1))
    run.train(argv(tmp_path / "2x4", 2, 4))
    _assert_same_training(tmp_path / "8x1", tmp_path / "2x4", [1, 2, 3])


@pytest.fixture(scope="module")
def muon_run(clm_stores, dropout_free, tmp_path_factory):
    """8 Muon steps of micro 8 x accumulation 2 on ZeRO-2, checkpoint at step 4, no dropout."""
    root = tmp_path_factory.mktemp("muon_run")

    def argv(out, micro, accum, *extra):
        return _layout(_muon_args(clm_stores, out, "--max_steps", "8", "--save_steps", "4", "--zero_stage", "2",
                                  *extra, config_dir=dropout_free["clm"]), micro, accum)
    run.train(argv(root / "full", 8, 2))
    return root / "full", argv


def test_muon_resume_is_exact_with_the_momentum_in_the_checkpoint(muon_run, tmp_path):
    full, argv = muon_run
    _resume_from(full, 4, tmp_path)
    run.train(argv(tmp_path, 8, 2, "--resume"))
    _assert_same_training(full, tmp_path, [5, 6, 7, 8])


def test_muon_resumes_on_another_split_of_the_global_batch(muon_run, tmp_path):
    full, argv = muon_run
    _resume_from(full, 4, tmp_path)
    run.train(argv(tmp_path, 4, 4, "--resume"))
    _assert_same_training(full, tmp_path, [5, 6, 7, 8])


@pytest.mark.parametrize("stage, refused", [(2, True), (0, False)])
def test_a_zero_sharded_muon_checkpoint_resumes_on_its_own_rank_count_only(stage, refused):
    """DeepSpeed 0.19's universal-checkpoint conversion (the bridge between rank counts) knows Adam's moments,
    not Muon's momentum (KeyError 'exp_avg'): another rank count is one line before anything is built. A
    ZeRO-0 checkpoint holds whole state and is not converted."""
    settings = checkpoints.resume_settings(config.parse(["--train_store", "s", "--config_name", "gpt2-tiny",
                                                         *MUON, "--zero_stage", str(stage)]))
    layout = {"train_data": "x", "train_blocks": 10, "sources": [], "global_batch": 8,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2}
    saved = {"layout": {**layout, "per_device_train_batch_size": 8, "world_size": 1}, "settings": settings}
    if refused:
        with pytest.raises(ConfigError, match="with ZeRO-2 resumes on 1 rank only"):
            checkpoints.check_resumable(saved, settings, layout, rank=0)
    else:
        checkpoints.check_resumable(saved, settings, layout, rank=0)


def test_a_diverging_muon_run_stops_naming_the_step(clm_stores, tmp_path):
    with pytest.raises(Diverged, match=r"training diverged at step \d+: loss nan"):
        run.train(_muon_args(clm_stores, tmp_path, "--learning_rate", "1e6", "--max_steps", "6"))
    assert not (tmp_path / "results.json").exists()


def test_muon_trains_an_mlm(mlm_stores, tmp_path, capsys):
    results = run.train(["--train_store", str(mlm_stores[0]), "--eval_store", str(mlm_stores[1]), *MUON,
                         "--config_name", "roberta-tiny", "--block_size", "64", "--packing", "documents",
                         "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_steps", "6",
                         "--output_dir", str(tmp_path), "--dataloader_num_workers", "0", "--disable_tqdm",
                         "--logging_steps", "1"])
    losses = _train_losses(tmp_path)
    assert results["task"] == "mlm" and losses[6] < losses[1]
    assert "Muon trains 12 matrices" in capsys.readouterr().out  # 6 a RoBERTa layer: q, k, v, o, in, out


@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16")])
def test_muon_trains_on_every_zero_stage_and_precision(stage, precision, clm_stores, tmp_path):
    results = run.train(_muon_args(clm_stores, tmp_path, "--max_steps", "6", "--zero_stage", str(stage),
                                   "--precision", precision))
    losses = _train_losses(tmp_path)
    assert results["zero_stage"] == stage and losses[6] < losses[1]


def _torchrun_two_ranks(argv, *, cwd):
    """`torchrun --nproc_per_node 2 fastlm/run.py argv` (it sets OMP_NUM_THREADS=1 itself); asserts exit 0."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "fastlm" / "run.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_rank_muon_run(muon_run, tmp_path_factory):
    """muon_run's 8 steps launched by `torchrun --nproc_per_node 2` as micro 8 x 2 ranks (the same global
    batch of 16; ZeRO-2: each rank holds half of Muon's momentum), checkpoint at step 4."""
    _, argv = muon_run
    root = tmp_path_factory.mktemp("two_rank_muon_run")
    proc = _torchrun_two_ranks(argv(root / "full", 8, 1), cwd=root)
    return root / "full", argv, proc


def test_muon_under_torchrun_takes_the_one_process_steps(muon_run, two_rank_muon_run):
    (one, _), (two, _, proc) = muon_run, two_rank_muon_run
    assert proc.stdout.count("[fastlm] --optim muon: Muon:") == 1  # rank 0 says it
    assert json.loads((two / "results.json").read_text())["world_size"] == 2
    _assert_same_training(one, two, list(range(1, 9)))


def test_muon_resumes_a_two_rank_checkpoint_exactly_under_the_deepspeed_launcher(two_rank_muon_run, tmp_path):
    """The torchrun run's step-4 checkpoint resumed by `deepspeed --num_gpus 2` (the same rank count, so
    each rank reloads its own half of the momentum) repeats steps 5-8."""
    full, argv, _ = two_rank_muon_run
    _resume_from(full, 4, tmp_path)
    _launch_two_ranks(argv(tmp_path, 8, 1, "--resume"), cwd=tmp_path)
    _assert_same_training(full, tmp_path, [5, 6, 7, 8])


def test_muon_trains_an_mlm_on_two_ranks(mlm_stores, tmp_path):
    _launch_two_ranks(["--task", "mlm", "--train_store", str(mlm_stores[0]), "--eval_store", str(mlm_stores[1]), *MUON,
                       "--config_name", "roberta-tiny", "--block_size", "64", "--packing", "documents",
                       "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--max_steps", "6",
                       "--zero_stage", "1", "--output_dir", str(tmp_path), "--dataloader_num_workers", "0",
                       "--disable_tqdm", "--logging_steps", "1"], cwd=tmp_path, launcher="torchrun")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["task"] == "mlm" and math.isfinite(results["eval_loss"])
    losses = _train_losses(tmp_path)
    assert losses[6] < losses[1]


def test_the_runner_starts_without_importing_deepspeeds_muon():
    """DeepSpeed's Muon module pulls in torch's inductor (about 2 s of a process's start): imported only
    when a Muon optimizer is built."""
    code = ("import sys, fastlm.train.main; "
            "assert 'deepspeed.runtime.zero.muon.muon_optimizer' not in sys.modules, 'muon imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
