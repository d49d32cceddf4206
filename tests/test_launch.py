"""The runner's launch forms. With no arguments of the user's, each runs the offline demo, from a working
directory outside the checkout, shortened to FASTLM_DEMO_STEPS=2 steps (the demo's own knob for tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm.train import demo
from fastlm.train.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = str(ROOT / "fastlm" / "run.py")


@pytest.mark.parametrize("argv, launcher_only", [
    ([], True),
    (["--local_rank=0"], True),  # what `deepspeed fastlm/run.py` passes
    (["--local_rank", "1"], True),
    (["--local_rank=0", "--max_steps", "3"], False),
    (["--help"], False),
])
def test_only_launcher_arguments_mean_the_demo(argv, launcher_only):
    assert demo.only_launcher_arguments(argv) is launcher_only


def test_the_demo_runs_300_steps_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLM_DEMO_STEPS", raising=False)
    argv = demo.demo_argv(tmp_path)
    assert argv[argv.index("--max_steps") + 1] == "300"
    monkeypatch.setenv("FASTLM_DEMO_STEPS", "2")
    argv = demo.demo_argv(tmp_path)
    assert argv[argv.index("--max_steps") + 1] == "2"


def test_a_second_rank_writing_the_demo_corpus_keeps_the_first_ones(monkeypatch, tmp_path):
    """Ranks write the corpus before any process group exists. The prepared-data cache is keyed by the
    file's mtime, so a rank arriving second (it found no corpus a moment ago) must not replace it."""
    corpus = tmp_path / "pydoc_topics.txt"
    corpus.write_text("the first rank's corpus\n")
    os.utime(corpus, ns=(1, 1))
    monkeypatch.setattr(Path, "is_file", lambda self: False)  # it looked before the first rank wrote
    demo.demo_argv(tmp_path)
    monkeypatch.undo()
    assert corpus.read_text() == "the first rank's corpus\n" and corpus.stat().st_mtime_ns == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pydoc_topics.txt"]  # no temporary file left


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """One working directory outside the checkout for every form: the first run prepares the demo's data
    under runs/demo, the others reuse it."""
    return tmp_path_factory.mktemp("elsewhere")


def _forms():
    port = lambda: str(free_port())  # noqa: E731
    return {
        "python -m fastlm.run": ([sys.executable, "-m", "fastlm.run"], 1),
        "fastlm train": ([str(BIN / "fastlm"), "train"], 1),
        "deepspeed fastlm/run.py": ([str(BIN / "deepspeed"), "--master_port", port(), SCRIPT], 1),
        "deepspeed --num_gpus 2 fastlm/run.py": ([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port(),
                                                  SCRIPT], 2),
        "torchrun --nproc_per_node 2 fastlm/run.py": ([str(BIN / "torchrun"), "--nproc_per_node", "2",
                                                       "--master_port", port(), SCRIPT], 2),
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_every_launch_form_without_arguments_runs_the_demo(form, elsewhere):
    cmd, ranks = _forms()[form]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(FASTLM_DEMO_STEPS="2", OMP_NUM_THREADS="1")  # 2 ranks on 2 cores: 1 thread each
    results_path = elsewhere / "runs" / "demo" / "results.json"
    results_path.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("no arguments: the offline demo") == 1  # rank 0 says it
    results = json.loads(results_path.read_text())
    assert results["steps"] == 2 and results["world_size"] == ranks
    assert results["ranks"]["overlapping_blocks"] == 0
