"""The runner's configuration: flags, their checks, the DeepSpeed config and the schedule. Nothing here
starts a process group; the command-line cases go through run.main for its exit status and message."""
import json

import pytest

from fastlm import config, run


# --- flags and the DeepSpeed config ------------------------------------------------------------------------------------

def _args(*argv):
    return config.parse_args(["--train_store", "s", "--config_name", "gpt2-tiny", *argv])


def test_config_from_flags():
    args, explicit = _args("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3",
                           "--zero_stage", "2", "--max_grad_norm", "0.5", "--weight_decay", "0.1")
    ds_config = config.build_ds_config(args, world_size=2, device_type="cpu", explicit=explicit)
    assert ds_config["train_micro_batch_size_per_gpu"] == 4
    assert ds_config["gradient_accumulation_steps"] == 3
    assert ds_config["train_batch_size"] == 24
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["gradient_clipping"] == 0.5
    assert ds_config["optimizer"]["type"] == "AdamW" and ds_config["optimizer"]["params"]["torch_adam"] is True
    assert ds_config["optimizer"]["params"]["weight_decay"] == 0.1
    assert not ds_config["bf16"]["enabled"] and not ds_config["fp16"]["enabled"]  # auto on CPU -> fp32
    assert args.precision == "fp32"


@pytest.mark.parametrize("argv, world, message", [
    (["--train_batch_size", "10"], 1, "batch sizes do not multiply out: train_batch_size 10 != micro batch 8"),
    (["--precision", "fp16"], 1, "fp16 is not supported on CPU"),
    (["--per_device_train_batch_size", "0"], 1, "must be a positive integer"),
    (["--train_batch_size", "16", "--per_device_train_batch_size", "8"], 4, "x 4 rank(s) = 32"),
])
def test_contradictory_flags_are_rejected(argv, world, message):
    args, explicit = _args(*argv)
    with pytest.raises(config.ConfigError, match=None) as error:
        config.build_ds_config(args, world_size=world, device_type="cpu", explicit=explicit)
    assert message in str(error.value)


def test_json_config_is_merged(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": True}}))
    args, explicit = _args("--deepspeed", str(cfg), "--gradient_accumulation_steps", "4")
    ds_config = config.build_ds_config(args, world_size=2, device_type="cpu", explicit=explicit)
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and args.per_device_train_batch_size == 2
    assert ds_config["gradient_accumulation_steps"] == 4  # "auto" takes the flag
    assert ds_config["train_batch_size"] == 16
    assert ds_config["zero_optimization"] == {"stage": 1, "overlap_comm": True} and args.zero_stage == 1
    assert args.precision == "bf16" and "fp16" not in ds_config


def test_json_contradicting_an_explicit_flag_is_rejected(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    args, explicit = _args("--deepspeed_config", str(cfg), "--per_device_train_batch_size", "8")
    with pytest.raises(config.ConfigError, match="--per_device_train_batch_size 8 contradicts train_micro_batch_size_per_gpu = 2"):
        config.build_ds_config(args, world_size=1, device_type="cpu", explicit=explicit)


@pytest.mark.parametrize("argv, message", [
    (["--config_name", "gpt2-tiny"], "give exactly one training source"),
    (["--train_store", "s", "--train_file", "t.txt", "--config_name", "gpt2-tiny"], "not both"),
    (["--train_store", "s"], "give exactly one of --model_name_or_path"),
    (["--train_file", "t.txt", "--config_name", "gpt2-tiny"], "preparing text needs a tokenizer"),
    (["--train_store", "s", "--config_name", "x", "--task", "mlm", "--eval_stride", "8"], "--eval_stride is for CLM"),
    (["--train_store", "s", "--config_name", "x", "--eval_stride", "999"], "--eval_stride must be in [1, block_size=128]"),
    (["--train_store", "s", "--config_name", "x", "--precision", "fp16"], "fp16 is not supported on CPU"),
    (["--train_store", "s", "--config_name", "x", "--block_size", "1"], "--block_size must be >= 2 for clm"),
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


def test_lr_schedule_warms_up_then_decays():
    args, _ = _args("--warmup_steps", "4", "--lr_scheduler_type", "linear")
    linear = config.lr_schedule(args, 12)
    assert [linear(s) for s in (0, 2, 4, 8, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    args.lr_scheduler_type = "cosine"
    cosine = config.lr_schedule(args, 12)
    assert cosine(4) == 1.0 and cosine(8) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0)
