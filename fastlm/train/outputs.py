"""What a run leaves in --output_dir in Hugging Face's layout, beside fastlm's own metrics.jsonl, results.json
and loss.png: the model and tokenizer at the top (`from_pretrained(output_dir)`, as after run_clm.py),
all_results.json / train_results.json / eval_results.json with Trainer's keys, a trainer_state.json-like log
history and the loss plot; and the upkeep of the checkpoints directory (experiment trackers: trackers.py).

Every file is written atomically (temporary name, then rename).
"""
import json
import math
import os
import re
import shutil
from pathlib import Path


# from_pretrained needs config.json: it goes last when a model is published and first when one is replaced.
MODEL_CONFIG = "config.json"


def write_text(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj, **dump_args):
    write_text(path, json.dumps(obj, indent=dump_args.pop("indent", 2), **dump_args) + "\n")


def publish_model(staged, out):
    """Move the files of a save_pretrained directory into `out`, which holds other files too. The old
    config.json goes first and the new one comes last, so a kill in between leaves a directory that
    from_pretrained refuses (no config) rather than one mixing old and new weights."""
    (out / MODEL_CONFIG).unlink(missing_ok=True)
    files = sorted(staged.iterdir(), key=lambda p: p.name == MODEL_CONFIG)
    for path in files:
        target = out / path.name
        if path.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
    staged.rmdir()


# --- Trainer's result files ---------------------------------------------------------------------------

def _hf_dump(path, obj):
    write_json(path, obj, indent=4, sort_keys=True)  # as Trainer.save_metrics writes them


def train_metrics(results, *, train_samples, global_batch):
    """run_clm.py's train_results.json from results.json: Trainer's keys and units."""
    runtime = results["train_runtime_s"]
    steps = results["steps"]
    return {"epoch": results["epochs"], "total_flos": results["total_flos"], "train_loss": results["train_loss"],
            "train_runtime": round(runtime, 4), "train_samples": train_samples,
            "train_samples_per_second": round(steps * global_batch / runtime, 3) if runtime else 0.0,
            "train_steps_per_second": round(steps / runtime, 3) if runtime else 0.0}


def eval_speed(runtime, eval_sets, *, batch_size):
    """Trainer's timing keys of an evaluation over every set: eval_runtime, eval_samples_per_second and
    eval_steps_per_second (batches of per_device_eval_batch_size)."""
    samples = sum(len(s.blocks) for s in eval_sets)
    steps = sum(math.ceil(len(s.blocks) / batch_size) for s in eval_sets)
    return {"eval_runtime": round(runtime, 4), "eval_samples_per_second": round(samples / runtime, 3) if runtime else 0.0,
            "eval_steps_per_second": round(steps / runtime, 3) if runtime else 0.0}


def eval_metrics(final_eval, *, epoch, eval_samples):
    """run_clm.py's eval_results.json: Trainer's keys plus perplexity = exp(eval_loss) (see docs/from-run-clm.md for
    how fastlm's token-weighted eval_loss relates to Trainer's), and fastlm's own eval_* values (tokens,
    bits per byte, each evaluation set's as eval_<name>_*). Samples and steps count every set."""
    return {**{key: value for key, value in final_eval.items() if key.startswith("eval_")},
            "epoch": epoch, "perplexity": final_eval["perplexity"], "eval_samples": eval_samples}


def write_hf_results(out, *, train=None, evaluation=None):
    """train_results.json, eval_results.json and all_results.json (the union), as run_clm.py leaves them."""
    if train:
        _hf_dump(out / "train_results.json", train)
    if evaluation:
        _hf_dump(out / "eval_results.json", evaluation)
    _hf_dump(out / "all_results.json", {**(train or {}), **(evaluation or {})})


_EVAL_TIMES = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def trainer_state(metrics, *, micro_batch, step, tokens_seen, total_flos, steps_per_epoch, total_steps, intervals,
                  final=None):
    """trainer_state.json's fields at `step`, its log_history rebuilt from metrics.jsonl (epochs as fractions,
    `lr` as `learning_rate`, evaluations as `eval_loss` with Trainer's timing keys); `final` is the entry
    Trainer adds when training ends (train_results.json's keys), None in a checkpoint's."""
    history = []
    for record in metrics:
        entry = {"step": record["step"], "epoch": round(record["step"] / steps_per_epoch, 4)}
        if "loss" in record:
            entry.update(loss=record["loss"], learning_rate=record["lr"], num_input_tokens_seen=record["tokens_seen"])
            if "grad_norm" in record:
                entry["grad_norm"] = record["grad_norm"]
        elif "eval_loss" in record:
            entry.update(eval_loss=record["eval_loss"], eval_perplexity=record["perplexity"],
                         **{key: record[key] for key in _EVAL_TIMES if key in record})
        else:
            continue
        history.append(entry)
    if final:
        history.append({"step": step, **final})
    every = lambda value: value if isinstance(value, int) else 0  # noqa: E731  ("epoch"/"no" have no step count)
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": step / steps_per_epoch, "global_step": step, "max_steps": total_steps,
            "num_train_epochs": math.ceil(total_steps / steps_per_epoch), "logging_steps": every(intervals.log_every),
            "eval_steps": every(intervals.eval_every), "save_steps": every(intervals.save_every),
            "train_batch_size": micro_batch, "num_input_tokens_seen": tokens_seen,
            "total_flos": total_flos, "log_history": history, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "stateful_callbacks": {},
            "trial_name": None, "trial_params": None}


def write_trainer_state(out, state):
    write_json(out / "trainer_state.json", state, sort_keys=True)


def write_hf_outputs(out, optim, results, final_eval, *, eval_sets, intervals, steps_per_epoch, total_steps,
                     world_size, metrics_path):
    """Trainer's result files, trainer_state.json and loss.png, for users comparing with run_clm.py / run_mlm.py."""
    train = evaluation = None
    if results["steps"]:
        global_batch = optim.per_device_train_batch_size * optim.gradient_accumulation_steps * world_size
        train = train_metrics(results, train_samples=results["train_blocks"], global_batch=global_batch)
        metrics = read_metrics(metrics_path)
        final = {key: value for key, value in train.items() if key != "train_samples"}
        write_trainer_state(out, trainer_state(metrics, micro_batch=optim.per_device_train_batch_size,
                                               step=results["steps"], tokens_seen=results["tokens_seen"],
                                               total_flos=results["total_flos"], steps_per_epoch=steps_per_epoch,
                                               total_steps=total_steps, intervals=intervals, final=final))
        plot_losses(metrics, out / "loss.png")
    if final_eval:
        evaluation = eval_metrics(final_eval, epoch=results["epochs"], eval_samples=sum(len(s.blocks) for s in eval_sets))
    write_hf_results(out, train=train, evaluation=evaluation)


# --- metrics.jsonl and the loss plot ---------------------------------------------------------------------

def read_metrics(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics, path):
    # Imported here, once at the end of a run: matplotlib adds ~0.5 s to every start-up otherwise.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --- checkpoints --------------------------------------------------------------------------------------

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # Trainer's PREFIX_CHECKPOINT_DIR-<global step>


def checkpoint_path(output_dir, step):
    return output_dir / f"checkpoint-{step}"


def list_checkpoints(output_dir):
    """The checkpoint-N directories in output_dir, oldest step first (those being written are hidden)."""
    if not output_dir.is_dir():
        return []
    found = {p: _CHECKPOINT.fullmatch(p.name) for p in output_dir.iterdir() if p.is_dir()}
    return sorted((p for p, m in found.items() if m), key=lambda p: int(found[p].group(1)))


def newest_checkpoint(output_dir):
    """The checkpoint --resume continues: the highest step's (Trainer's get_last_checkpoint), or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def replace_directory(staged, target):
    """Give the complete directory `staged` the name `target`; an old `target` (the same step saved by an
    abandoned run) is renamed away first and then deleted, so `target` never names a mix of the two."""
    trash = target.with_name(f".tmp-deleted-{target.name}")
    if target.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(target, trash)
    os.replace(staged, target)
    shutil.rmtree(trash, ignore_errors=True)


def _delete_directory(path):
    trash = path.with_name(f".tmp-deleted-{path.name}")
    os.replace(path, trash)  # a half-deleted checkpoint never sits under a loadable name
    shutil.rmtree(trash)


def clear_checkpoints(checkpoints):
    """--overwrite_output_dir: delete the earlier run's checkpoints, newest first (each is renamed out of
    reach, then deleted), so an interrupted deletion leaves only whole checkpoints behind."""
    for path in reversed(checkpoints):
        _delete_directory(path)


def prune_checkpoints(checkpoints, keep, *, saved):
    """--save_total_limit: keep `keep` checkpoints (oldest step first in `checkpoints`): the one just `saved`
    (a resumed run may save below an older run's later steps) and the newest others."""
    kept = {saved}
    for path in reversed(checkpoints):
        if len(kept) >= keep:
            break
        kept.add(path)
    for path in checkpoints:
        if path not in kept:
            _delete_directory(path)
