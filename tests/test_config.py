"""The runner's configuration: flags, their checks, the frozen RunConfig, the DeepSpeed config and the schedule.
Nothing here starts a process group; the command-line cases go through run.main for its exit status and message."""
import dataclasses
import json

import pytest

from fastlm import run
from fastlm.train import config, deepspeed_config, flags, hf_flags, outputs
from fastlm.train.errors import ConfigError
from fastlm.train.schedule import Intervals, check_lr_schedule, lr_schedule
from fastlm.train.trackers import resolve_report_to


# --- flags and the DeepSpeed config ------------------------------------------------------------------------------------

def _config(*argv):
    return config.parse(["--train_store", "s", "--config_name", "gpt2-tiny", *argv])


def _refused(argv, capsys):
    """The stderr of a command line that must exit with status 2 (and no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        _config(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_the_configuration_is_frozen_and_sectioned():
    cfg = _config("--learning_rate", "3e-4", "--lr_scheduler_kwargs", '{"num_cycles": 2}')
    assert cfg.optim.learning_rate == 3e-4 and cfg.data.block_size is None and cfg.model.config_name == "gpt2-tiny"
    for section, name in [(cfg, "do_train"), (cfg.optim, "learning_rate"), (cfg.data, "block_size"),
                          (cfg.model, "task"), (cfg.checkpoint, "output_dir"), (cfg.logging, "report_to")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, None)
    with pytest.raises(TypeError):  # nested settings are read-only too
        cfg.optim.lr_scheduler_kwargs["num_cycles"] = 3
    before = dict(vars(cfg.optim))
    deepspeed_config.build(cfg.optim, world_size=2, device_type="cpu")  # derived, never written back
    assert vars(cfg.optim) == before


def test_config_from_flags():
    cfg = _config("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3",
                  "--zero_stage", "2", "--max_grad_norm", "0.5", "--weight_decay", "0.1")
    ds_config = deepspeed_config.build(cfg.optim, world_size=2, device_type="cpu")
    assert ds_config["train_micro_batch_size_per_gpu"] == 4
    assert ds_config["gradient_accumulation_steps"] == 3
    assert ds_config["train_batch_size"] == 24
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["gradient_clipping"] == 0.5
    assert ds_config["optimizer"]["type"] == "AdamW" and ds_config["optimizer"]["params"]["torch_adam"] is True
    assert ds_config["optimizer"]["params"]["weight_decay"] == 0.1
    assert not ds_config["bf16"]["enabled"] and not ds_config["fp16"]["enabled"]  # auto on CPU -> fp32
    assert cfg.optim.precision == "fp32"


@pytest.mark.parametrize("argv, world, message", [
    (["--train_batch_size", "10"], 1, "batch sizes do not multiply out: train_batch_size 10 != micro batch 8"),
    (["--precision", "fp16"], 1, "fp16 is not supported on CPU"),
    (["--per_device_train_batch_size", "0"], 1, "must be a positive integer"),
    (["--train_batch_size", "16", "--per_device_train_batch_size", "8"], 4, "x 4 rank(s) = 32"),
])
def test_contradictory_flags_are_rejected(argv, world, message):
    cfg = _config(*argv)
    with pytest.raises(ConfigError, match=None) as error:
        deepspeed_config.build(cfg.optim, world_size=world, device_type="cpu")
    assert message in str(error.value)


def test_json_config_is_merged(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": True}}))
    run_config = _config("--deepspeed", str(cfg), "--gradient_accumulation_steps", "4")
    optim = run_config.optim
    ds_config = deepspeed_config.build(optim, world_size=2, device_type="cpu")
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and optim.per_device_train_batch_size == 2
    assert ds_config["gradient_accumulation_steps"] == 4  # "auto" takes the flag
    assert ds_config["train_batch_size"] == 16
    assert ds_config["zero_optimization"] == {"stage": 1, "overlap_comm": True} and optim.zero_stage == 1
    assert optim.precision == "bf16" and "fp16" not in ds_config


def test_json_contradicting_an_explicit_flag_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    err = _refused(["--deepspeed_config", str(cfg), "--per_device_train_batch_size", "8"], capsys)
    assert "--per_device_train_batch_size 8 contradicts train_micro_batch_size_per_gpu = 2" in err


@pytest.mark.parametrize("argv, message", [
    (["--config_name", "gpt2-tiny"], "give exactly one training source"),
    (["--train_store", "s", "--train_file", "t.txt", "--config_name", "gpt2-tiny"], "not both"),
    (["--train_store", "s"], "give a model: --model_name_or_path (fine-tune), or --config_name / --model_type"),
    (["--train_file", "t.txt", "--config_name", "gpt2-tiny"], "preparing text needs a tokenizer"),
    (["--train_store", "s", "--config_name", "x", "--task", "mlm", "--eval_stride", "8"], "--eval_stride is for CLM"),
    (["--train_store", "s", "--config_name", "x", "--eval_stride", "999", "--block_size", "128"],
     "--eval_stride must be in [1, block_size=128]"),
    (["--train_store", "s", "--config_name", "gpt2-tiny", "--precision", "fp16"], "fp16 is not supported on CPU"),
    (["--train_store", "s", "--config_name", "gpt2-tiny", "--block_size", "1"], "--block_size must be >= 2 for clm"),
    (["--train_file", "t.txt", "--train_tokenizer", "--vocab_size", "100", "--config_name", "gpt2-tiny"],
     "--vocab_size must be an integer in [257, 4194304]"),
    # The BPE trainer would abort the process (SIGABRT) reserving ~70 GB for this size.
    (["--train_file", "t.txt", "--train_tokenizer", "--vocab_size", "1000000000", "--config_name", "gpt2-tiny"],
     "--vocab_size must be an integer in [257, 4194304] for a trained byte-level BPE"),
])
def test_bad_command_lines_exit_with_one_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run.main([*argv, "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resume_without_checkpoint_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--train_store", "s", "--config_name", "gpt2-tiny", "--resume", "--output_dir", str(tmp_path)])
    assert "--resume: no checkpoint" in capsys.readouterr().err


def _factors(optim, total_steps, steps):
    import torch

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    (factor,) = lr_schedule(optim, total_steps)(optimizer).lr_lambdas
    return [factor(s) for s in steps]


def test_lr_schedule_warms_up_then_decays():
    optim = _config("--warmup_steps", "4", "--lr_scheduler_type", "linear").optim
    assert _factors(optim, 12, (0, 2, 4, 8, 12)) == [0.0, 0.5, 1.0, 0.5, 0.0]
    cosine = _factors(dataclasses.replace(optim, lr_scheduler_type="cosine"), 12, (4, 8, 12))
    assert cosine[0] == 1.0 and cosine[1] == pytest.approx(0.5) and cosine[2] == pytest.approx(0.0)


@pytest.mark.parametrize("argv, steps, expected", [
    # TrainingArguments' warmup below 1 is a fraction of the run: 0.25 of 12 steps = 3
    (["--warmup_steps", "0.25"], (0, 3, 12), [0.0, 1.0, 0.0]),
    (["--warmup_ratio", "0.25"], (0, 3, 12), [0.0, 1.0, 0.0]),
    # HF's constant has no warmup even when one is given; constant_with_warmup has
    (["--lr_scheduler_type", "constant", "--warmup_steps", "4"], (0, 12), [1.0, 1.0]),
    (["--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "4"], (0, 2, 12), [0.0, 0.5, 1.0]),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'], (0, 12), [1.0, 0.1]),
])
def test_hf_scheduler_names_and_warmup_forms(argv, steps, expected):
    assert _factors(_config(*argv).optim, 12, steps) == pytest.approx(expected)


def test_scheduler_arguments_are_checked_before_anything_starts():
    optim = _config("--lr_scheduler_type", "cosine_with_min_lr").optim  # needs min_lr or min_lr_rate
    with pytest.raises(ConfigError, match="--lr_scheduler_type cosine_with_min_lr with --lr_scheduler_kwargs {}"):
        check_lr_schedule(optim, 10)


# --- Hugging Face flags ------------------------------------------------------------------------------------------------

def test_every_training_arguments_flag_is_honoured_or_judged():
    """A TrainingArguments flag is an Args field or has a verdict (no effect: warning; impossible: error), so
    none falls through to argparse's bare "unrecognized arguments"."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert fields - {f.name for f in dataclasses.fields(flags.Flags)} - set(hf_flags.FOREIGN) == set()


@pytest.mark.parametrize("argv, message", [
    (["--fsdp", "full_shard"], "--fsdp is not supported: the runner shards with DeepSpeed ZeRO"),
    (["--streaming"], "--streaming is not supported: the runner reads a memory-mapped token store"),
    (["--use_fast_tokenizer", "false"], "--use_fast_tokenizer is not supported"),
    (["--optim", "adafactor"], "--optim adafactor is not supported: the runner trains with AdamW"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "it steps on evaluation metrics"),
    (["--save_strategy", "best"], "--save_strategy best is not supported"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor is not supported"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are both set"),
    (["--lr_scheduler_kwargs", "[1]"], "--lr_scheduler_kwargs must be a JSON object"),
    (["--tpu_num_cores", "8"], "unrecognized arguments: --tpu_num_cores 8"),
])
def test_hf_flags_that_cannot_be_honoured_are_one_clear_error(argv, message, capsys):
    assert message in _refused(argv, capsys)


def test_hf_flags_without_effect_warn_and_values_that_change_nothing_pass(capsys):
    _config("--push_to_hub", "--hub_model_id", "me/model", "--report_to", "comet_ml", "--dataloader_drop_last",
          "--use_fast_tokenizer", "--label_smoothing_factor", "0.0", "--push_to_hub", "false", "--log_level", "passive")
    err = capsys.readouterr().err
    assert "--hub_model_id has no effect here: fastlm never uploads" in err
    assert "--report_to comet_ml has no effect here" in err
    # the last --push_to_hub (false) wins; the others ask for what the runner does anyway
    for quiet in ("push_to_hub", "dataloader_drop_last", "use_fast_tokenizer", "label_smoothing", "log_level"):
        assert quiet not in err


def test_hf_spellings_map_onto_the_runner():
    cfg = _config("--bf16", "--max_seq_length", "64", "--max_steps", "-1", "--num_train_epochs", "2.5",
                  "--no_keep_linebreaks", "--do_train", "True", "--evaluation_strategy", "steps", "--logging_steps",
                  "20", "--save_strategy", "steps", "--torch_dtype", "auto", "--report_to", "all")
    assert cfg.optim.precision == "bf16" and cfg.data.block_size == 64 and cfg.optim.max_steps == 0
    assert cfg.optim.num_train_epochs == 2.5 and cfg.data.keep_linebreaks is False
    # eval_strategy steps turns evaluation on, every logging_steps (TrainingArguments' rules)
    assert cfg.do_train and cfg.do_eval and cfg.evaluation.eval_steps == 20
    assert cfg.checkpoint.save_steps == 500 and cfg.logging.report_to == tuple(resolve_report_to(["all"]))
    alone = _config("--do_eval")
    assert alone.do_eval and not alone.do_train
    neither = _config()
    assert neither.do_train and neither.do_eval and neither.task == "clm"  # gpt2-tiny: resolved while parsing


def test_a_run_clm_arguments_file(tmp_path):
    """`run_clm.py args.json`: a single .json argument holds the flags."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"train_store": "s", "model_type": "gpt2", "do_train": True, "num_train_epochs": 2,
                                "report_to": ["none"], "lr_scheduler_kwargs": {"num_cycles": 2}}))
    cfg = config.parse([str(path)])
    assert cfg.model.model_type == "gpt2" and cfg.do_train and not cfg.do_eval and cfg.optim.num_train_epochs == 2.0
    assert dict(cfg.optim.lr_scheduler_kwargs) == {"num_cycles": 2} and cfg.logging.report_to == ()


@pytest.mark.parametrize("argv, task", [
    (["--config_name", "gpt2-tiny"], "clm"), (["--config_name", "roberta-tiny"], "mlm"),
    (["--model_type", "bert"], "mlm"), (["--model_type", "llama"], "clm"),
    (["--model_type", "bert", "--task", "clm"], "clm"),
])
def test_task_follows_the_model_unless_given(argv, task):
    assert config.parse(["--train_store", "s", *argv]).task == task


def test_intervals_follow_hf_strategies():
    every = Intervals.of(_config("--logging_steps", "0.25", "--eval_strategy", "epoch", "--save_steps", "3",
                                 "--logging_first_step"), 12)
    assert [s for s in range(1, 13) if every.log(s)] == [1, 3, 6, 9, 12]  # a quarter of the run, first and last
    assert every.evaluate(4, epoch_end=True) and not every.evaluate(4) and not every.evaluate(12, epoch_end=True)
    assert [s for s in range(1, 13) if every.save(s)] == [3, 6, 9, 12]
    cfg = _config("--logging_strategy", "no", "--save_steps", "2.5")
    with pytest.raises(ConfigError, match="--save_steps must be a whole number"):
        Intervals.of(cfg, 12)


# --- output directory and checkpoints ------------------------------------------------------------------------------------

def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", "s", "--config_name", "gpt2-tiny", "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"--output_dir {tmp_path / 'out'} is a file" in capsys.readouterr().err


def test_resume_from_checkpoint_forms(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (4, 12):  # the newest is the highest step, as Trainer's get_last_checkpoint picks it
        (run_dir / f"checkpoint-{step}" / f"global_step{step}").mkdir(parents=True)
        (run_dir / f"checkpoint-{step}" / "latest").write_text(f"global_step{step}")
    (run_dir / ".tmp-checkpoint-16").mkdir()  # a save that never completed is not a checkpoint
    newest = run_dir / "checkpoint-12"
    for given, expected in [(None, newest), (str(run_dir), newest), (str(run_dir / "checkpoint-4"),
                                                                     run_dir / "checkpoint-4")]:
        cfg = _config("--output_dir", str(run_dir), "--resume_from_checkpoint", *([given] if given else []))
        assert cfg.checkpoint.resume and cfg.checkpoint.resume_point() == expected
    assert "not a checkpoint" in _refused(["--resume_from_checkpoint", str(tmp_path)], capsys)
    assert "no checkpoint-N directory" in _refused(["--output_dir", str(tmp_path), "--resume"], capsys)
    assert "give one of them" in _refused(["--output_dir", str(run_dir), "--resume", "--overwrite_output_dir"],
                                          capsys)


def test_save_total_limit_keeps_the_checkpoint_just_saved(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-40").write_text("a file, not a checkpoint")
    # e.g. a run resumed from checkpoint-2 that saved checkpoint-4 again
    outputs.prune_checkpoints(outputs.list_checkpoints(tmp_path), 2, saved=tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-40", "checkpoint-8"]


# --- DeepSpeed JSON ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a DeepSpeed config is a JSON object ({...}), this file holds a list"),
    ('{"zero_optimization": {"stage": 1, "overlap_com": true}}', "DeepSpeedZeroConfig: overlap_com: Extra inputs are not permitted"),
    ('{"bf16": {"enabled": "maybe"}}', "DeepSpeedBF16Config: enabled: Input should be a valid boolean"),
])
def test_a_bad_deepspeed_json_is_one_line_before_anything_starts(content, message, tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", "missing", "--config_name", "gpt2-tiny", "--deepspeed", str(cfg),
                  "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_unknown_top_level_deepspeed_keys_are_named(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimisation": {"stage": 2}, "wall_clock_breakdown": False,
                               "activation_checkpointing": {}, "train_micro_batch_size_per_gpu": "auto"}))
    deepspeed_config.build(_config("--deepspeed", str(cfg)).optim, world_size=1, device_type="cpu")
    err = capsys.readouterr().err
    assert "does not know the top-level key(s) zero_optimisation and ignores them" in err
    assert "wall_clock_breakdown" not in err and "activation_checkpointing" not in err


@pytest.mark.parametrize("flag", ["--train_file", "--validation_file"])
def test_an_empty_text_file_is_one_line(flag, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("some words\nand more words\n" * 20)
    files = {"--train_file": tmp_path / "text.txt", "--validation_file": tmp_path / "text.txt", flag: tmp_path / "empty.txt"}
    with pytest.raises(SystemExit) as exit_:
        run.main([*(a for k, v in files.items() for a in (k, str(v))), "--train_tokenizer", "--vocab_size", "300",
                  "--config_name", "gpt2-tiny", "--output_dir", str(tmp_path / "out"), "--cache_dir",
                  str(tmp_path / "cache")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"fastlm train: error: {flag} {tmp_path / 'empty.txt'}: no documents found" in err
    assert "Traceback" not in err


# --- the block size run_clm.py / run_mlm.py take without --block_size / --max_seq_length ---------------------------------

def test_the_default_block_size_follows_the_script_being_replaced(gpt2_tok, bert_tok, tmp_path, capsys):
    import copy

    from transformers import GPT2Config

    from fastlm.train import main

    def limited(tokenizer, limit):
        tokenizer = copy.copy(tokenizer)
        tokenizer.model_max_length = limit
        return tokenizer

    huge = limited(gpt2_tok, int(1e30))  # what a tokenizer without a recorded limit says (a trained BPE's)
    gpt2_tok, bert_tok = limited(gpt2_tok, 1024), limited(bert_tok, 512)  # as the hub's tokenizer configs say
    GPT2Config(n_positions=256).save_pretrained(tmp_path / "short")

    def resolved(tokenizer, *argv):
        cfg = config.parse(["--train_store", "s", "--output_dir", str(tmp_path / "out"), *argv])
        assert cfg.data.block_size is None  # resolved once the tokenizer is known, never written back
        return main.Run(cfg, 0, held=None).resolve_block_size(tokenizer).data.block_size

    assert resolved(gpt2_tok, "--config_name", "gpt2-tiny") == 1024  # GPT-2's model_max_length
    assert resolved(huge, "--config_name", "gpt2-tiny") == 1024  # min(1024, GPT-2's positions)
    assert resolved(huge, "--config_name", str(tmp_path / "short")) == 256  # the model's positions
    assert resolved(gpt2_tok, "--config_name", str(tmp_path / "short")) == 256
    assert resolved(bert_tok, "--config_name", "bert-tiny", "--task", "mlm") == 512  # run_mlm: model_max_length
    assert resolved(huge, "--config_name", "roberta-tiny") == 1024  # run_mlm's cap
    with pytest.raises(ConfigError, match=r"--eval_stride must be in \[1, block_size=1024\]"):
        resolved(huge, "--config_name", "gpt2-tiny", "--eval_stride", "2000")
    out = capsys.readouterr().out
    assert "[fastlm] block size 256: min(1024, the model's 256 positions)" in out
    assert "[fastlm] block size 512: the tokenizer's model_max_length, as run_mlm.py" in out
