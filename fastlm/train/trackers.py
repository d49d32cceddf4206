"""Experiment trackers for --report_to (wandb, mlflow, trackio, tensorboard), under the names Trainer uses.

Each tracker is driven through its own public client API and writes what transformers' integration for it
(WandbCallback, MLflowCallback, TrackioCallback, TensorBoardCallback) writes for the same run: MLflow gets
Trainer's log keys as they are (loss, learning_rate, grad_norm, epoch, eval_loss, ...) at the global step;
wandb, trackio and tensorboard get them as train/<key> and eval/<key> (transformers' rewrite_logs), wandb and
trackio with train/global_step beside them; the run's arguments (and the model's config) as its
config/params. fastlm's own values keep their metrics.jsonl meaning under the same scheme (eval_perplexity,
each evaluation set's eval_<set>_*, tokens_per_second, a mixture's train_<source>_loss, mfu).

The clients are optional (`pip install "fastlm[trackers]"`) and imported only when a run asks for them.
A tracker that fails during the run is dropped with one warning; the run goes on.
"""
import importlib.util
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastlm.train.errors import warn

SUPPORTED = ("mlflow", "tensorboard", "wandb", "trackio")  # `all` opens them in the order Trainer lists them
# Trainer's other integrations: a run_clm.py command line that names them still runs here (with a warning).
TRAINER_ONLY = frozenset({"azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte",
                          "kubeflow", "neptune", "swanlab"})
STATUSES = ("success", "failed", "killed")
# metrics.jsonl keys under the names Trainer logs them (trainer_state.json's log_history uses them too)
_RECORD_RENAMES = {"lr": "learning_rate", "tokens_seen": "num_input_tokens_seen",
                   "tokens_per_s": "tokens_per_second", "perplexity": "eval_perplexity"}


class TrackerError(ValueError):
    """--report_to asks for a tracker that cannot run: unknown, its client not installed, or it fails to start."""


def installed(name):
    """Whether a tracker's client is installed, as transformers' is_<name>_available tells (tensorboard: the
    package torch.utils.tensorboard needs)."""
    if name == "mlflow" and _mlflow_disabled():
        return False
    return importlib.util.find_spec(name) is not None


def _mlflow_disabled():
    return os.environ.get("DISABLE_MLFLOW_INTEGRATION", "FALSE").upper() == "TRUE"


def resolve_report_to(values, *, warn=warn):
    """--report_to's values (a string or a list; each may be comma-separated) as the list of trackers to open.

    none/no: none. all: every supported tracker whose client is installed. A tracker of Trainer's that fastlm
    does not drive: a warning, and it is left out. Raises TrackerError for a name nobody knows or a tracker
    whose client is not installed (naming the package to install)."""
    names = [v.strip().lower() for value in ([values] if isinstance(values, str) else values or ())
             for v in value.split(",")]
    names = list(dict.fromkeys(name for name in names if name))
    if {"none", "no"} & set(names):
        return []
    if "all" in names:
        return [name for name in SUPPORTED if installed(name)]
    unknown = [name for name in names if name not in SUPPORTED and name not in TRAINER_ONLY]
    if unknown:
        raise TrackerError(f"--report_to {' '.join(unknown)}: unknown tracker; choose from none, all, "
                           f"{', '.join(sorted(SUPPORTED))}")
    ignored = [name for name in names if name in TRAINER_ONLY]
    if ignored:
        warn(f"--report_to {' '.join(ignored)} has no effect here: fastlm reports to {', '.join(sorted(SUPPORTED))} "
             "and metrics.jsonl")
    chosen = [name for name in names if name in SUPPORTED]
    if "mlflow" in chosen and _mlflow_disabled():
        raise TrackerError("--report_to mlflow: DISABLE_MLFLOW_INTEGRATION=TRUE turns mlflow off; unset it or "
                           "leave mlflow out of --report_to")
    missing = [name for name in chosen if not installed(name)]
    if missing:
        raise TrackerError(f"--report_to {' '.join(missing)}: not installed; pip install {' '.join(missing)} "
                           '(or pip install "fastlm[trackers]" for every tracker)')
    return chosen


# --- names --------------------------------------------------------------------------------------------

def trainer_logs(record, *, steps_per_epoch=None):
    """A metrics.jsonl record as the `logs` Trainer passes its callbacks (the names MLflow writes): lr as
    learning_rate, tokens_seen as num_input_tokens_seen, perplexity as eval_perplexity, the epoch as a
    fraction (step / steps_per_epoch, when given). Values that are not finite numbers are left out: a
    window without target tokens has no loss."""
    logs = {}
    for key, value in record.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            logs[_RECORD_RENAMES.get(key, key)] = value
    epoch = record["step"] / steps_per_epoch if steps_per_epoch else record.get("epoch")
    if epoch is not None:
        logs["epoch"] = epoch
    return logs


def slashed(logs):
    """transformers' rewrite_logs: eval_<key> as eval/<key>, every other key as train/<key>; a training
    source's train_<name>_loss as train/<name>_loss."""
    return {f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key.removeprefix('train_')}": value
            for key, value in logs.items()}


# --- the clients --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What every tracker needs to know about the run it opens."""
    output_dir: Path
    run_name: str = None
    project: str = "huggingface"
    config: dict = field(default_factory=dict)  # the run's arguments
    model_config: dict = field(default_factory=dict)
    logging_dir: Path = None

    @property
    def combined(self):
        """Trainer's combined_dict: the model's config under the run's arguments."""
        return {**self.model_config, **self.config}


class _Wandb:
    """WandbCallback: project from WANDB_PROJECT (else "huggingface"), WANDB_MODE and the rest of wandb's
    settings from the environment, as wandb reads them."""

    def __init__(self, run):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=run.run_name,
                              config=run.combined, allow_val_change=True)
        try:
            self.run.define_metric("train/global_step")
            self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        except BaseException:
            self.finish("failed")
            raise

    def log(self, logs, step):
        self.run.log({**slashed(logs), "train/global_step": step})

    def finish(self, status):
        self.run.finish(exit_code={"success": 0, "failed": 1, "killed": 143}[status])  # 143: ended by SIGTERM
        # finish() can return before wandb's service has written the run out; a runner that leaves through
        # os._exit (several ranks) skips wandb's own exit hook, so wait for it here.
        self.wandb.teardown()


class _Mlflow:
    """MLflowCallback: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID, MLFLOW_NESTED_RUN,
    MLFLOW_TAGS, MLFLOW_FLATTEN_PARAMS and MLFLOW_MAX_LOG_PARAMS as Trainer reads them."""

    _STATUS = {"success": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, run):
        import mlflow

        self.mlflow = mlflow
        if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])  # creates it when missing
        self.active = mlflow.start_run(run_name=run.run_name, nested=_env_true("MLFLOW_NESTED_RUN"))
        try:
            self._log_params(run.combined)
            if os.environ.get("MLFLOW_TAGS"):
                mlflow.set_tags(json.loads(os.environ["MLFLOW_TAGS"]))
        except BaseException:
            mlflow.end_run("FAILED")
            raise

    def _log_params(self, params):
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if _env_true("MLFLOW_FLATTEN_PARAMS"):
            params = _flatten(params)
        # MLflow stores parameters as strings of bounded length; Trainer drops the longer ones.
        items = [(key, value) for key, value in params.items() if len(str(value)) <= MAX_PARAM_VAL_LENGTH]
        limit = os.environ.get("MLFLOW_MAX_LOG_PARAMS", "")
        if limit.isdigit():
            items = items[:int(limit)]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.mlflow.log_params(dict(items[start:start + MAX_PARAMS_TAGS_PER_BATCH]))

    def log(self, logs, step):
        # MLflow refuses some characters in metric names; Trainer replaces them the same way.
        metrics = {re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key): value for key, value in logs.items()}
        self.mlflow.log_metrics(metrics, step=step, run_id=self.active.info.run_id)

    def finish(self, status):
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(self._STATUS[status])


class _Trackio:
    """TrackioCallback: a local run in project --project (trackio's store: TRACKIO_DIR). trackio reserves
    config keys that start with "_" (a model config's _name_or_path): they are left out."""

    def __init__(self, run):
        import trackio

        self.trackio = trackio
        config = {key: value for key, value in run.combined.items() if not key.startswith("_")}
        trackio.init(project=run.project, name=run.run_name, config=config, resume="allow")

    def log(self, logs, step):
        self.trackio.log({**slashed(logs), "train/global_step": step})

    def finish(self, status):
        self.trackio.finish()  # trackio records no end status


class _TensorBoard:
    """TensorBoardCallback: event files in --logging_dir, else TENSORBOARD_LOGGING_DIR, else
    <output_dir>/runs/<time>_<host>; the arguments (and model config) as text, scalars at the global step."""

    def __init__(self, run):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run.logging_dir or os.environ.get("TENSORBOARD_LOGGING_DIR") or (
            Path(run.output_dir) / "runs" / f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}")
        self.writer = SummaryWriter(log_dir=str(Path(log_dir).expanduser()))
        self.writer.add_text("args", json.dumps(run.config, indent=2, default=str))
        if run.model_config:
            self.writer.add_text("model_config", json.dumps(run.model_config, indent=2, default=str))

    def log(self, logs, step):
        for tag, value in slashed(logs).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, status):
        self.writer.close()


_CLIENTS = {"wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio, "tensorboard": _TensorBoard}


def _env_true(name):
    return os.environ.get(name, "FALSE").upper() in {"1", "ON", "YES", "TRUE"}


def _flatten(params, prefix=""):
    flat = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, name) if value and isinstance(value, dict) else {name: value})
    return flat


# --- the run's trackers -------------------------------------------------------------------------------

class Trackers:
    """The open trackers of a run: log() sends each metrics record to all of them, finish() ends them (safe
    to call again, and on every exit path; `with` calls it). A tracker that raises is dropped with one
    warning and the others go on."""

    def __init__(self, clients, *, steps_per_epoch=None):
        self._clients = dict(clients)
        self.steps_per_epoch = steps_per_epoch
        self._tokens_seen = None  # Trainer logs it with evaluations too: the last training record's

    @property
    def names(self):
        return list(self._clients)

    def log(self, record):
        """One metrics.jsonl record (it has a "step")."""
        if not self._clients:
            return
        logs = trainer_logs(record, steps_per_epoch=self.steps_per_epoch)
        if "num_input_tokens_seen" in logs:
            self._tokens_seen = logs["num_input_tokens_seen"]
        elif self._tokens_seen is not None:
            logs["num_input_tokens_seen"] = self._tokens_seen
        for name, client in list(self._clients.items()):
            try:
                client.log(logs, record["step"])
            except Exception as error:
                self._drop(name, f"logging step {record['step']} failed", error)

    def finish(self, status="success"):
        if status not in STATUSES:
            raise ValueError(f"finish status {status!r}: expected one of {', '.join(STATUSES)}")
        clients, self._clients = self._clients, {}
        for name, client in clients.items():
            try:
                client.finish(status)
            except Exception as error:
                warn(f"--report_to {name}: ending its run failed ({_describe(error)})")

    def _drop(self, name, what, error):
        client = self._clients.pop(name)
        warn(f"--report_to {name}: {what} ({_describe(error)}); {name} is dropped and the run goes on "
              "(metrics.jsonl keeps every record)")
        try:  # ends what the client still holds (mlflow's active run, wandb's process) as failed
            client.finish("failed")
        except Exception:
            pass  # it is broken already, and said so

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.finish(_exit_status(exc_type, exc))
        return False


def _exit_status(exc_type, exc):
    """How a `with` block ended: Ctrl-C, or sys.exit(128 + signal) from a signal handler, is a kill."""
    if exc_type is None:
        return "success"
    if issubclass(exc_type, KeyboardInterrupt):
        return "killed"
    if issubclass(exc_type, SystemExit):
        code = exc.code
        return "success" if code in (0, None) else "killed" if isinstance(code, int) and code > 128 else "failed"
    return "failed"


def _describe(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def open_trackers(names, *, output_dir, run_name=None, project="huggingface", config=None, model_config=None,
                  logging_dir=None, steps_per_epoch=None):
    """Start a run in each tracker of `names` (resolve_report_to's list; call it on the logging rank only,
    with [] elsewhere) and return their Trackers. Raises TrackerError, after ending the ones already
    started, when one fails to start (a tracking URI its client does not know, for instance): nothing has
    been logged yet."""
    run = RunInfo(output_dir=Path(output_dir), run_name=run_name, project=project or "huggingface",
                  config=dict(config or {}), model_config=dict(model_config or {}),
                  logging_dir=Path(logging_dir) if logging_dir else None)
    clients = {}
    for name in names:
        try:
            clients[name] = _CLIENTS[name](run)
        except Exception as error:
            Trackers(clients).finish("failed")
            raise TrackerError(f"--report_to {name}: could not start a run ({_describe(error)})") from error
    return Trackers(clients, steps_per_epoch=steps_per_epoch)
