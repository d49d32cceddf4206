"""The runner's checkpoints, in the layout Trainer with DeepSpeed writes: <output_dir>/checkpoint-N/ holds the
model and tokenizer (from_pretrained loads it) and trainer_state.json, DeepSpeed's state in global_stepN/ with
DeepSpeed's `latest` file naming it, and fastlm.json (data layout, the settings that change the result, the
size and sha256 of every file). A checkpoint is written under a temporary name and renamed when complete; it
is verified and compared before a resume builds anything, and converted to DeepSpeed's universal format when
the rank count changes.
"""
import argparse
import contextlib
import io
import json
import os
import shutil

from deepspeed.checkpoint import ds_to_universal

from fastlm.store import sha256_file
from fastlm.train import config as run_config
from fastlm.train import outputs
from fastlm.train.dist import rank0_then_others
from fastlm.train.errors import CheckpointFailed, ConfigError
from fastlm.train.safe_load import rng_state
from fastlm.train.sampling import describe_sources
from fastlm.writes import failed_write

# Flags whose change alters what a resumed run computes: --resume refuses a checkpoint saved with other
# values. The data layout (micro batch, accumulation, ranks) is not among them: a step trains on the same
# samples whatever their split (sampling.TrainBatches), and the training data is compared by content.
RESULT_FLAGS = ("task", "model_name_or_path", "config_name", "model_type", "config_overrides", "block_size",
                "line_by_line", "packing", "separator",
                "mlm_probability", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                "optim", "muon_lr", "muon_momentum", "max_grad_norm", "lr_scheduler_type", "warmup_steps", "zero_stage",
                "precision", "seed")
# Flags that only change how long the run goes on (and so where the schedule's decay ends): a resumed run
# may change them, and is told what that does.
LENGTH_FLAGS = ("max_steps", "num_train_epochs")


def resume_settings(config):
    """The flag values a checkpoint records, for --resume to compare (RESULT_FLAGS, LENGTH_FLAGS)."""
    return {name: run_config.value(config, name) for name in RESULT_FLAGS + LENGTH_FLAGS}


def universal_if_resharded(ckpt_dir, tag, *, world_size, rank):
    """(tag to load, whether it is in DeepSpeed's universal format).

    DeepSpeed cannot load optimizer state partitioned over another number of ranks (ZeRO 1-3, one
    *zero_pp_rank_* file per rank): such a checkpoint is first converted by rank 0 to DeepSpeed's
    universal format, which loads on any rank count. ZeRO-0 checkpoints hold whole state and load as they are.
    """
    shards = len(list((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    if shards in (0, world_size):
        return tag, False
    universal = f"{tag}_universal"

    def convert():
        print(f"[fastlm] the checkpoint's optimizer state is split over {shards} ranks, this run has {world_size}: "
              f"converting {ckpt_dir / tag} to DeepSpeed's universal format", flush=True)
        tmp = ckpt_dir / f"{universal}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        options = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report is pages long
            ds_to_universal.main(options)
        shutil.rmtree(ckpt_dir / universal, ignore_errors=True)
        os.replace(tmp, ckpt_dir / universal)
        # ds_to_universal points a `latest_universal` file at its output folder (our temporary name); the
        # converted checkpoint is a one-off bridge, removed once loaded, so nothing should point at it.
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)

    rank0_then_others(convert, rank=rank, what="convert the checkpoint to DeepSpeed's universal format")
    return universal, True


# Beside each DeepSpeed checkpoint: what --resume compares before anything is built (data layout, settings).
CHECKPOINT_SETTINGS = "fastlm.json"


def deepspeed_tag(step):
    return f"global_step{step}"  # what Trainer names DeepSpeed's state inside checkpoint-N


def save_checkpoint(engine, output_dir, step, state, *, layout, settings, rank, write_hf_files):
    """<output_dir>/checkpoint-<step>: DeepSpeed's state (global_step<step>/, with the data position and RNG
    state in its client state, and DeepSpeed's `latest`), then on rank 0 write_hf_files(directory) (the
    model, tokenizer and trainer_state.json) and fastlm.json (data layout, settings, and the size and sha256
    of every file, which --resume verifies). All of it goes into a temporary directory that is renamed when
    complete: a checkpoint-N directory is never incomplete, so --resume never picks a half-written one.
    A write that fails (disk full, file-size limit) raises CheckpointFailed naming the file and the errno;
    the temporary directory is removed and the checkpoints saved before stay as they were."""
    final = outputs.checkpoint_path(output_dir, step)
    staging = output_dir / f".tmp-{final.name}"
    if rank == 0:  # an abandoned save's files would mix into this one
        shutil.rmtree(staging, ignore_errors=True)
    try:
        engine.save_checkpoint(str(staging), tag=deepspeed_tag(step), client_state={**state, "rng": rng_state()})
        write_hf_files(staging)  # ZeRO-3 gathers the weights here: every rank takes part
        if rank != 0:
            return
        # save_checkpoint ends with a barrier: every rank's files are written.
        files = {str(path.relative_to(staging)): [path.stat().st_size, sha256_file(path)]
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        outputs.write_json(staging / CHECKPOINT_SETTINGS, {"layout": layout, "settings": settings, "files": files})
    except Exception as error:
        failure = write_failure(error, staging)
        if failure is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        kept = outputs.newest_checkpoint(output_dir)
        kept = f"{kept} is still the newest checkpoint" if kept else "no checkpoint was saved before"
        raise CheckpointFailed(f"step {step}: cannot save checkpoint {final}: {failure}; nothing of it was kept "
                               f"({kept}). Free space there (or raise the file-size limit, ulimit -f), then "
                               "--resume") from None
    outputs.replace_directory(staging, final)


def write_failure(error, directory):
    """'<file>: [Errno N] <reason>' for an error that is a failed write under `directory`, else None (then it
    is some other error, raised as it is); fastlm.writes.failed_write finds the file and errno."""
    failed = failed_write(error, directory)
    if failed is None:
        return None
    path, code = failed
    return f"{path}: [Errno {code}] {os.strerror(code)}"


def checkpoint_to_resume(directory):
    """(the DeepSpeed tag in checkpoint `directory` that its `latest` names, its fastlm.json); one-line errors
    for a dangling `latest` or a missing or unreadable fastlm.json."""
    advice = "give --resume_from_checkpoint another checkpoint-N, or start a new run"
    latest = directory / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag or not (directory / tag).is_dir():
        raise ConfigError(f"--resume: {latest} names {tag!r}, which is not a directory in {directory}; {advice}")
    path = directory / CHECKPOINT_SETTINGS
    try:
        return tag, json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume: {path} is missing: the checkpoint was saved incompletely or by an older "
                          f"fastlm, so it cannot be verified; {advice}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: cannot read {path} ({error}); {advice}") from None


def verify_checkpoint(directory, files):
    """Refuse a checkpoint with a file missing, truncated or changed since it was saved, naming the file."""
    if files is None:
        raise ConfigError(f"--resume: {directory / CHECKPOINT_SETTINGS} records no checksums (saved by an older "
                          "fastlm), so the checkpoint cannot be verified; start a new run")
    advice = "give --resume_from_checkpoint another checkpoint-N, or start a new run"
    for name, (size, digest) in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"--resume: checkpoint file {path} is missing; {advice}")
        if path.stat().st_size != size:
            raise ConfigError(f"--resume: checkpoint file {path} is truncated or changed ({path.stat().st_size} "
                              f"bytes, {size} when saved); {advice}")
        if sha256_file(path) != digest:
            raise ConfigError(f"--resume: checkpoint file {path} is corrupt (its sha256 differs from the one "
                              f"recorded when it was saved); {advice}")


def data_layout(optim, *, world_size, train_blocks):
    """What a checkpoint's data position (epoch, sample position) counts in: the blocks (by content and
    number, and each mixture source's weight) and how each optimizer step splits its global batch."""
    return {**train_blocks.identity(),
            "global_batch": optim.per_device_train_batch_size * optim.gradient_accumulation_steps * world_size,
            "per_device_train_batch_size": optim.per_device_train_batch_size,
            "gradient_accumulation_steps": optim.gradient_accumulation_steps, "world_size": world_size}


def check_resumable(saved, settings, layout, *, rank):
    """Refuse a checkpoint whose run computed something else; say what a changed layout or length does.

    Allowed: another split of the same global batch (micro batch x accumulation x ranks), which trains on
    the same samples in the same order; another global batch, which continues at the same sample
    position of the epoch (no sample skipped or repeated) with steps of another size; another training
    length. Refused: other training data, or any RESULT_FLAGS value.
    """
    saved_layout, saved_settings = saved.get("layout"), saved.get("settings")
    if saved_layout is None or saved_settings is None or "train_data" not in saved_layout:
        raise ConfigError("--resume: the checkpoint does not record its data layout and settings (it was "
                          "saved by an older fastlm), so its data position cannot be trusted; start a new run")
    if (saved_layout["train_data"], saved_layout["train_blocks"]) != (layout["train_data"], layout["train_blocks"]):
        was, now = saved_layout.get("sources", []), layout["sources"]
        if len(was) > 1 or len(now) > 1:
            raise ConfigError(f"--resume: the checkpoint was trained on the mixture {describe_sources(was)}; now "
                              f"{describe_sources(now)}. Its data position counts samples of that mixture: resume "
                              "with the same sources and weights, or start a new run")
        raise ConfigError(f"--resume: the checkpoint was trained on other data ({saved_layout['train_blocks']} "
                          f"blocks, content {saved_layout['train_data'][:12]}; now {layout['train_blocks']} blocks, "
                          f"content {layout['train_data'][:12]}); resume on the same data or start a new run")
    ranks = saved_layout["world_size"]
    if settings["optim"] == "muon" and settings["zero_stage"] and ranks != layout["world_size"]:
        raise ConfigError(f"--resume: a --optim muon checkpoint with ZeRO-{settings['zero_stage']} resumes on {ranks} "
                          f"rank{'s' * (ranks > 1)} only (DeepSpeed's conversion between rank counts does not carry "
                          "Muon's momentum); another micro batch x accumulation of the same rank count works")
    changed = [f"--{name} {saved_settings.get(name)} -> {settings[name]}" for name in RESULT_FLAGS
               if saved_settings.get(name) != settings[name]]
    if changed:
        raise ConfigError(f"--resume: the checkpoint was saved with other settings ({', '.join(changed)}); resume "
                          "with the settings it was saved with, or start a new run (--output_dir elsewhere)")
    if rank != 0:
        return
    lengths = [f"--{name} {saved_settings.get(name)} -> {settings[name]}" for name in LENGTH_FLAGS
               if saved_settings.get(name) != settings[name]]
    if lengths:
        print(f"[fastlm] resuming with another training length ({', '.join(lengths)}): the learning-rate "
              "schedule now ends at the new last step", flush=True)
    split = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
    was = " x ".join(str(saved_layout[k]) for k in split)
    now = " x ".join(str(layout[k]) for k in split)
    if saved_layout["global_batch"] != layout["global_batch"]:
        print(f"[fastlm] the global batch changed from {saved_layout['global_batch']} ({was}, micro x accumulation "
              f"x ranks) to {layout['global_batch']} ({now}): continuing at the checkpoint's sample position of the "
              "epoch, no sample skipped or repeated; steps from here hold another number of samples", flush=True)
    elif was != now:
        print(f"[fastlm] resuming with micro batch x accumulation x ranks {now} (was {was}): the same global batch "
              f"of {layout['global_batch']}, so the same samples in the same order as the uninterrupted run", flush=True)
