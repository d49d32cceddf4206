"""fastlm.train.trackers against the real clients in their offline/local modes (wandb offline, mlflow's file
store, trackio's local store, tensorboard event files), each read back through the client's own API."""
import math
import shutil
import struct
import sys
import uuid

import pytest

from fastlm.train.trackers import (SUPPORTED, TRAINER_ONLY, TrackerError, open_trackers, resolve_report_to, slashed,
                                   trainer_logs)


def _eval_record(step, loss):
    """An evaluation record as the runner writes it: the first set's values also without the set's name."""
    sets = {"wiki": loss, "code": loss + 0.5}
    record = {"step": step, "eval_loss": loss, "perplexity": math.exp(loss), "eval_tokens": 300,
              "eval_bits_per_byte": loss / math.log(2) / 4}
    for name, value in sets.items():
        record.update({f"eval_{name}_loss": value, f"eval_{name}_perplexity": math.exp(value),
                       f"eval_{name}_tokens": 300, f"eval_{name}_bits_per_byte": value / math.log(2) / 4})
    return record


def _train_record(step):
    return {"step": step, "epoch": 0, "loss": 6.0 / step, "lr": 1e-4 * step, "grad_norm": 0.5 + step,
            "tokens_per_s": 1000.0 + step, "tokens_seen": 512 * step}


# A run logging every 2 steps, evaluating at step 4 and at its end (step 6), 8 steps to an epoch.
RECORDS = [_train_record(2), _train_record(4), _eval_record(4, 3.0), _train_record(6), _eval_record(6, 2.5)]
STEPS_PER_EPOCH = 8
TRAIN_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen", "tokens_per_second"}
EVAL_KEYS = {"eval_loss", "eval_perplexity", "eval_tokens", "eval_bits_per_byte", "epoch"} | {
    f"eval_{name}_{key}" for name in ("wiki", "code") for key in ("loss", "perplexity", "tokens", "bits_per_byte")}
CONFIG = {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "report_to": ["mlflow"], "run_name": "tiny"}
# the run's arguments win, as in Trainer; a model config's to_dict() has _name_or_path
MODEL_CONFIG = {"n_layer": 2, "learning_rate": "not the model's", "_name_or_path": "tiny-gpt2"}


def _run(names, **kwargs):
    trackers = open_trackers(names, output_dir=kwargs.pop("output_dir", "unused"), run_name="tiny", config=CONFIG,
                             model_config=MODEL_CONFIG, steps_per_epoch=STEPS_PER_EPOCH, **kwargs)
    for record in RECORDS:
        trackers.log(record)
    return trackers


# --- --report_to --------------------------------------------------------------------------------------

def test_report_to_takes_trainers_values():
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(SUPPORTED) | TRAINER_ONLY == set(INTEGRATION_TO_CALLBACK)  # every name Trainer takes

    assert resolve_report_to("none") == resolve_report_to(["no"]) == resolve_report_to([]) == []
    assert resolve_report_to(["wandb,mlflow", "trackio", "wandb"]) == ["wandb", "mlflow", "trackio"]
    assert resolve_report_to("TensorBoard") == ["tensorboard"]
    assert resolve_report_to(["mlflow", "none"]) == []
    # `all` is what Trainer's `all` picks among the trackers fastlm drives
    assert resolve_report_to("all") == [n for n in get_available_reporting_integrations() if n in SUPPORTED]
    assert resolve_report_to("all") == ["mlflow", "tensorboard", "wandb", "trackio"]  # the test set-up has them all
    warnings = []
    assert resolve_report_to(["comet_ml", "wandb"], warn=warnings.append) == ["wandb"]
    assert len(warnings) == 1 and "--report_to comet_ml has no effect here" in warnings[0]
    with pytest.raises(TrackerError, match="--report_to wandbb: unknown tracker; choose from none, all, mlflow"):
        resolve_report_to("wandbb")


def test_a_tracker_that_is_not_installed_is_refused_with_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    with pytest.raises(TrackerError, match=r"--report_to wandb: not installed; pip install wandb \(or pip install "
                                           r'"fastlm\[trackers\]" for every tracker\)'):
        resolve_report_to(["mlflow", "wandb"])
    assert "wandb" not in resolve_report_to("all")
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "true")
    assert "mlflow" not in resolve_report_to("all")
    with pytest.raises(TrackerError, match="DISABLE_MLFLOW_INTEGRATION=TRUE turns mlflow off"):
        resolve_report_to("mlflow")
    assert issubclass(TrackerError, ValueError)


# --- names --------------------------------------------------------------------------------------------

def test_records_take_trainers_names_and_rewrite_logs_prefixes():
    from transformers.integrations.integration_utils import rewrite_logs

    train = trainer_logs(RECORDS[0], steps_per_epoch=STEPS_PER_EPOCH)
    assert train == {"loss": 3.0, "learning_rate": 2e-4, "grad_norm": 2.5, "tokens_per_second": 1002.0,
                     "num_input_tokens_seen": 1024, "epoch": 0.25}
    evaluation = trainer_logs(RECORDS[2], steps_per_epoch=STEPS_PER_EPOCH)
    assert set(evaluation) == EVAL_KEYS and evaluation["eval_perplexity"] == math.exp(3.0)
    for logs in (train, evaluation):
        assert slashed(logs) == rewrite_logs(logs)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch"} <= set(slashed(train))
    assert {"eval/loss", "eval/perplexity", "eval/wiki_loss", "eval/code_perplexity"} <= set(slashed(evaluation))
    # a mixture's per-source values; a window without target tokens has no loss; the epoch as logged without
    # steps_per_epoch
    mixture = trainer_logs({"step": 3, "epoch": 1, "loss": None, "train_web_loss": math.nan, "train_web_tokens": 9,
                            "mfu": 0.25})
    assert slashed(mixture) == {"train/web_tokens": 9, "train/mfu": 0.25, "train/epoch": 1}


# --- each tracker, read back --------------------------------------------------------------------------

def test_mlflow_file_store_run_has_trainers_metric_history(tmp_path, monkeypatch):
    """The done-when: MLFLOW_TRACKING_URI=file:./mlruns leaves a FINISHED run whose loss history has one point
    per logging step, under MLflowCallback's names, with the run's arguments as parameters."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for it to use a file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fastlm-trackers")
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "lm"}')
    trackers = _run(["mlflow"])
    trackers.finish()
    trackers.finish()  # a second call (another exit path) does nothing

    client = MlflowClient(tracking_uri="file:./mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("fastlm-trackers").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and run.data.tags["team"] == "lm"
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    assert set(history) == TRAIN_KEYS | EVAL_KEYS
    assert history["loss"] == [(2, 3.0), (4, 1.5), (6, 1.0)]
    assert [step for step, _ in history["learning_rate"]] == [2, 4, 6]
    assert history["eval_loss"] == [(4, 3.0), (6, 2.5)] and history["eval_code_loss"] == [(4, 3.5), (6, 3.0)]
    # on every log, as Trainer's
    assert history["epoch"] == [(2, 0.25), (4, 0.5), (4, 0.5), (6, 0.75), (6, 0.75)]
    assert history["num_input_tokens_seen"] == [(2, 1024), (4, 2048), (4, 2048), (6, 3072), (6, 3072)]
    assert run.data.params == {"learning_rate": "0.001", "per_device_train_batch_size": "16",
                               "report_to": "['mlflow']", "run_name": "tiny", "n_layer": "2",
                               "_name_or_path": "tiny-gpt2"}


def _wandb_records(path):
    """The records of a .wandb file (LevelDB's log format: 32 KiB blocks of [crc32, length, type] + data
    chunks, after a 7-byte file header), parsed with wandb's own protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, chunks = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_offline_run_has_trainers_history(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "fastlm-trackers")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(["wandb"]).finish()

    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(_wandb_records(path))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "fastlm-trackers" and run.display_name == "tiny"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["learning_rate"] == 1e-3 and config["n_layer"] == 2 and config["_name_or_path"] == "tiny-gpt2"
    history = [{key: json.loads(item.value_json) for item in r.history.item
                if not (key := item.key or "/".join(item.nested_key)).startswith("_")}  # _step, _runtime: wandb's
               for r in records if r.HasField("history")]
    assert [row["train/global_step"] for row in history] == [2, 4, 4, 6, 6]
    assert [(row["train/global_step"], row["train/loss"]) for row in history if "train/loss" in row] == [
        (2, 3.0), (4, 1.5), (6, 1.0)]
    assert set(history[0]) == {f"train/{key}" for key in TRAIN_KEYS} | {"train/global_step"}
    assert set(history[2]) == {f"eval/{key[5:]}" for key in EVAL_KEYS - {"epoch"}} | {
        "train/epoch", "train/num_input_tokens_seen", "train/global_step"}  # Trainer adds both to every log
    assert {r.metric.name for r in records if r.HasField("metric")} >= {"train/global_step"}
    (exit_record,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == 0


def test_trackio_local_run_has_trainers_history(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path))  # read when trackio is first imported
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    project = f"fastlm-{uuid.uuid4().hex[:8]}"  # its own database, wherever an earlier import put the store
    _run(["trackio"], project=project).finish()

    (run,) = trackio.Api().runs(project)
    assert run.name == "tiny" and run.config["learning_rate"] == 1e-3 and run.config["n_layer"] == 2
    assert "_name_or_path" not in run.config  # trackio reserves keys starting with "_"
    logs = SQLiteStorage.get_logs(project, "tiny")
    assert [row["train/global_step"] for row in logs] == [2, 4, 4, 6, 6]
    assert [row["train/loss"] for row in logs if "train/loss" in row] == [3.0, 1.5, 1.0]
    assert [row["eval/perplexity"] for row in logs if "eval/perplexity" in row] == [math.exp(3.0), math.exp(2.5)]


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_have_trainers_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _run(["tensorboard"], output_dir=tmp_path).finish()

    (log_dir,) = (tmp_path / "runs").iterdir()  # Trainer's default: <output_dir>/runs/<time>_<host>
    events, scalars = _scalars(log_dir)
    assert set(scalars) == {f"train/{key}" for key in TRAIN_KEYS} | {f"eval/{key[5:]}" for key in EVAL_KEYS
                                                                      - {"epoch"}}
    assert scalars["train/loss"] == [(2, 3.0), (4, 1.5), (6, 1.0)]
    assert [step for step, _ in scalars["eval/perplexity"]] == [4, 6]
    assert "args" in str(events.Tags()["tensors"])  # add_text stores the arguments as a tensor summary


# --- failures -----------------------------------------------------------------------------------------

def _mlflow_store(monkeypatch, store):
    """A file store of its own and an experiment in it (mlflow keeps the experiment that set_experiment
    chose for the rest of the process: every test names its own)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fastlm")


def _mlflow_run():
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("fastlm").experiment_id])
    return run


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch, capsys):
    store = tmp_path / "mlruns"
    _mlflow_store(monkeypatch, store)
    trackers = open_trackers(["mlflow", "tensorboard"], output_dir=tmp_path, logging_dir=tmp_path / "tb")
    trackers.log(RECORDS[0])
    run = _mlflow_run()
    shutil.rmtree(store)  # the tracking store is gone
    for record in RECORDS[1:]:
        trackers.log(record)
    trackers.finish()

    warnings = [line for line in capsys.readouterr().err.splitlines() if "[fastlm] warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("[fastlm] warning: --report_to mlflow: logging step 4 failed (")
    assert warnings[0].endswith("mlflow is dropped and the run goes on (metrics.jsonl keeps every record)")
    assert trackers.names == []
    _, scalars = _scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(2, 3.0), (4, 1.5), (6, 1.0)]  # tensorboard logged every record
    import mlflow

    assert mlflow.active_run() is None and run.info.status == "RUNNING"


@pytest.mark.parametrize("error, status", [
    (RuntimeError("diverged"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
    (SystemExit(143), "KILLED"),  # a SIGTERM handler's sys.exit(128 + 15)
    (SystemExit(0), "FINISHED"), (SystemExit(2), "FAILED")])
def test_with_block_ends_the_run_on_every_exit_path(tmp_path, monkeypatch, error, status):
    _mlflow_store(monkeypatch, tmp_path / "mlruns")
    with pytest.raises(type(error)):
        with open_trackers(["mlflow"], output_dir=tmp_path) as trackers:
            trackers.log(RECORDS[0])
            raise error
    assert _mlflow_run().info.status == status
    trackers.finish("success")  # already ended: nothing happens
    assert _mlflow_run().info.status == status
    with pytest.raises(ValueError, match="finish status 'done'"):
        trackers.finish("done")


def test_a_tracker_that_cannot_start_is_a_configuration_error(tmp_path, monkeypatch):

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://tracking")
    with pytest.raises(TrackerError, match=r"--report_to mlflow: could not start a run \(.*nosuchstore"):
        open_trackers(["tensorboard", "mlflow"], output_dir=tmp_path, logging_dir=tmp_path / "tb")


def test_no_trackers_on_the_other_ranks():
    trackers = open_trackers([], output_dir="unused")
    for record in RECORDS:
        trackers.log(record)
    trackers.finish("failed")
    assert trackers.names == []


def test_mlflow_names_and_steps_are_those_trainer_writes(tmp_path, monkeypatch):
    """A tiny Trainer run and fastlm's trackers, same logging and evaluation steps, in one MLflow store:
    Trainer's training and evaluation names all come back from fastlm's run, at the same steps."""
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    _mlflow_store(monkeypatch, tmp_path / "mlruns")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (16, 8))]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, logging_steps=2, eval_strategy="steps",
                             eval_steps=4, per_device_train_batch_size=4, report_to=["mlflow"], run_name="trainer",
                             include_num_input_tokens_seen="all", save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4]).train()
    fastlm = open_trackers(["mlflow"], output_dir=tmp_path, run_name="fastlm", steps_per_epoch=4)
    for record in (_train_record(2), _train_record(4), _eval_record(4, 3.0)):
        fastlm.log(record)
    fastlm.finish()

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fastlm").experiment_id])
    steps = {run.info.run_name: {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                                 for key in run.data.metrics} for run in runs}
    # Trainer's own timings (eval_runtime, train_runtime, ...) and end-of-run summary are not fastlm's to log
    timings = {key for key in steps["trainer"] if key.endswith(("_runtime", "_per_second")) or key in {
        "total_flos", "train_loss"}}
    assert set(steps["trainer"]) - timings == {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen",
                                               "eval_loss"}
    for key in set(steps["trainer"]) - timings:
        # Trainer adds the epoch and tokens seen to every log, its end-of-run summary included
        summary = [4] if key in {"epoch", "num_input_tokens_seen"} else []
        assert steps["fastlm"][key] + summary == steps["trainer"][key], key


def test_the_runner_starts_without_mlflow_and_mlflow_still_imports():
    """deepspeed's autotuner imports mlflow where it is installed (~1.5 s of every start): the runner hides it
    for that import only."""
    import subprocess

    pytest.importorskip("mlflow")
    code = ("import sys, fastlm.train; assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules; "
            "import mlflow; print(mlflow.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "mlflow", out.stderr[-2000:]
