"""Preparing text once per node when the nodes do not share the cache directory (node-local disks),
simulated on one machine: ranks that claim to be the first of their node (LOCAL_RANK 0) with cache
directories of their own."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch.multiprocessing as mp

from fastlm.train import dist as run_dist
from tests.data import wikitext_lines

ROOT = Path(__file__).resolve().parents[1]


def _node(rank, world_size, port, directories, local_ranks, out):
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    directory = Path(directories[rank])

    def work():
        with open(directory / "prepared_by", "a") as f:
            f.write(f"{rank}\n")

    run_dist.once_per_filesystem(work, directory, rank=rank, what="prepare the data")

    def failing():
        if rank == 2:
            raise OSError("disk full")

    try:
        run_dist.once_per_filesystem(failing, directory, rank=rank, what="prepare the data")
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    (Path(out) / f"rank{rank}").write_text(outcome)
    dist.barrier()
    dist.destroy_process_group()


def test_each_filesystem_is_prepared_once_by_its_lowest_rank(tmp_path):
    """Ranks 0 and 1 share one node (one directory); rank 2 is a node of its own with its own disk."""
    shared, local = tmp_path / "node0", tmp_path / "node1"
    mp.spawn(_node, args=(3, run_dist.free_port(), [str(shared), str(shared), str(local)], [0, 1, 0], str(tmp_path)),
             nprocs=3)
    assert (shared / "prepared_by").read_text() == "0\n"
    assert (local / "prepared_by").read_text() == "2\n"
    assert not list(tmp_path.rglob(".fastlm-who-shares-*"))  # the markers are gone
    # A failure on one node stops every rank, naming the rank where it happened.
    assert (tmp_path / "rank2").read_text() == "OSError: disk full"
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "RuntimeError: rank 2 could not prepare the data: OSError: disk full"


def test_a_run_on_two_nodes_with_node_local_caches(tmp_path):
    """Two ranks, each the first of its "node" with a cache directory of its own (what nodes with local
    disks see): each prepares its copy of the text, and they train together."""
    lines = [line for line in wikitext_lines("valid") if line.strip()]
    (tmp_path / "train.txt").write_text("".join(lines[:200]), encoding="utf-8")
    (tmp_path / "valid.txt").write_text("".join(lines[200:230]), encoding="utf-8")
    port = str(run_dist.free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(ROOT / "fastlm" / "run.py"), "--train_file", str(tmp_path / "train.txt"),
               "--validation_file", str(tmp_path / "valid.txt"), "--train_tokenizer", "--vocab_size", "300",
               "--config_name", "gpt2-tiny", "--block_size", "64", "--max_steps", "2", "--per_device_train_batch_size",
               "4", "--cache_dir", str(tmp_path / f"cache{rank}"), "--output_dir", str(tmp_path / "out"),
               "--dataloader_num_workers", "0", "--disable_tqdm"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=tmp_path))
    logs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "not shared with rank 0 (a node-local disk); this node prepares its own copy" in logs[1]
    copies = [next(p for p in (tmp_path / f"cache{rank}").iterdir() if p.is_dir()) for rank in range(2)]  # not its .lock
    for name in ("train", "validation"):
        assert (copies[0] / name / "tokens.bin").read_bytes() == (copies[1] / name / "tokens.bin").read_bytes()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
