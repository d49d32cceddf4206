"""Launch the runner: `deepspeed fastlm/run.py`, `torchrun fastlm/run.py`, `python -m fastlm.run`, `fastlm train`.

Without arguments (or only the --local_rank a launcher adds) it runs the offline demo (fastlm/train/demo.py).
Launch it any of these ways (the arguments are the same):

    python -m fastlm.run                                       # the offline demo
    deepspeed fastlm/run.py                                    # the demo through DeepSpeed's launcher
    python -m fastlm.run --task clm --train_store S --config_name gpt2-tiny --output_dir runs/x
    fastlm train --task mlm --train_file train.txt --validation_file valid.txt \\
        --model_name_or_path distilroberta-base --output_dir runs/mlm
    deepspeed --num_gpus 2 fastlm/run.py ... --zero_stage 2          # one node, 2 GPUs (2 CPU ranks: set
                                                                     # OMP_NUM_THREADS=1 on a 2-core box)
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 fastlm/run.py ... --zero_stage 3
        # hostfile lines "worker-1 slots=8"; every node needs the same checkout and data paths
    torchrun --nproc_per_node 2 fastlm/run.py ...
    deepspeed fastlm/run.py ... --deepspeed ds_config.json    # a DeepSpeed JSON merged with the flags
    deepspeed fastlm/run.py --model_name_or_path gpt2 --train_file train.txt --validation_file valid.txt \\
        --per_device_train_batch_size 8 --do_train --do_eval --output_dir out   # a run_clm.py command, unchanged

The runner itself is the package fastlm/train/ (main.py is a run from command line to outputs).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed fastlm/run.py`, `torchrun fastlm/run.py`): Python put fastlm/ itself first on
    # sys.path, where its modules would shadow top-level ones; put the checkout there instead, so
    # `import fastlm` works even without `pip install -e .`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fastlm.train.main import main, train  # noqa: E402  (after the path fix)

__all__ = ["main", "train"]

if __name__ == "__main__":
    sys.exit(main())
