"""The offline demo: what the runner trains when it is given no arguments (or only the --local_rank a launcher
adds). It prepares the stdlib's pydoc_data.topics text, trains a byte-level BPE tokenizer on it, trains a tiny
GPT for a minute or two on CPU and prints the held-out perplexity (outputs under runs/demo in the working
directory; FASTLM_DEMO_STEPS=N shortens it to N steps).
"""
import contextlib
import os
from pathlib import Path

from pydoc_data.topics import topics


def only_launcher_arguments(argv):
    """Whether argv holds nothing but what a launcher adds: DeepSpeed's appends `--local_rank=N` (torchrun
    and `python -m` add nothing; they pass the rank in the environment)."""
    rest = list(argv)
    while rest[:1] == ["--local_rank"] or rest and rest[0].startswith("--local_rank="):
        rest = rest[2:] if rest[0] == "--local_rank" else rest[1:]
    return not rest


DEMO_DIR = Path("runs/demo")  # relative: the demo writes under the directory it is started from
DEMO_STEPS = 300


def demo_argv(output_dir=DEMO_DIR, max_steps=None):
    """Arguments of the offline demo, after writing its corpus: every pydoc topic as one document (a
    line: the topics' own newlines become spaces) from the stdlib, so every machine has it.

    max_steps defaults to $FASTLM_DEMO_STEPS, else DEMO_STEPS: tests run the demo's launch forms for a
    few steps through the environment, the one input a launcher passes on unchanged.
    """
    output_dir = Path(output_dir)
    corpus = output_dir / "pydoc_topics.txt"
    if not corpus.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = corpus.with_name(f"{corpus.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(" ".join(text.split()) + "\n" for _, text in sorted(topics.items())), encoding="utf-8")
        # Every rank of a launch gets here before any process group exists. A hard link never replaces:
        # the first rank's file stays, so all ranks see one file (its mtime is part of the key of the
        # prepared-data cache, which a second rename would change under rank 0's feet).
        with contextlib.suppress(FileExistsError):
            os.link(tmp, corpus)
        tmp.unlink()
    max_steps = max_steps or os.environ.get("FASTLM_DEMO_STEPS", DEMO_STEPS)
    return ["--task", "clm", "--train_file", str(corpus), "--train_tokenizer", "--vocab_size", "4096",
            "--config_name", "gpt2-mini", "--block_size", "128", "--separator", "eos",
            "--validation_split_percentage", "10", "--per_device_train_batch_size", "16",
            "--learning_rate", "2e-3", "--weight_decay", "0.01", "--warmup_steps", "30",
            "--lr_scheduler_type", "cosine", "--max_steps", str(max_steps), "--logging_steps", "10",
            "--eval_steps", "100",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir)]
