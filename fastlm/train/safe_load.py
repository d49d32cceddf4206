"""Loading never runs code: checkpoints are scanned for pickled code before anything loads, and every load is
torch.load(weights_only=True) with a pinned allow-list.

A pickle can call any function while it loads (`os.system`, `open`, ...). DeepSpeed's own loaders call
torch.load(weights_only=False), so fastlm scans every file first (reading pickle opcodes, running nothing),
swaps in a checkpoint engine that loads with weights_only=True, and forces weights_only=True on the
torch.load calls DeepSpeed makes itself (the universal-checkpoint conversion and loader). The RNG state
fastlm saves is tensors and plain containers, so a checkpoint it writes needs nothing beyond DeepSpeed's
own few objects.
"""
import contextlib
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from fastlm.train.errors import ConfigError

REFUSAL = "fastlm does not load code from checkpoints"

# Objects DeepSpeed pickles into ZeRO optimizer states (and the universal optimizer_state.pt): plain
# classes rebuilt from their attributes or enum values, none of which runs code while it loads.
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScaler,  # fp16 runs
    "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStageEnum,
    "deepspeed.utils.tensor_fragment.fragment_address": fragment_address,
}
# The previous release saved numpy's RNG state as a uint32 numpy array (numpy 2 and numpy 1 spell the
# module differently). Allowed only in model-states files, which carry the client state, so those checkpoints resume.
_reconstruct = np.zeros(0).__reduce__()[0]  # how numpy pickles an array, under numpy 1 and 2 alike
LEGACY_RNG_GLOBALS = {
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.dtypes.UInt32DType": np.dtypes.UInt32DType,
}
_CLIENT_STATE_FILE = "model_states.pt"  # DeepSpeed's mp_rank_XX_model_states.pt (ZeRO-3: zero_pp_rank_X_...)


class UnsafeCheckpoint(ConfigError):
    """A checkpoint or model file holds something that loading it would have to run (one line, exit status 2)."""


def scan_checkpoint(directory):
    """Refuse, before anything loads, a checkpoint directory whose *.pt files pickle anything beyond
    tensors, plain containers and the allow-lists: one line naming the file and the object."""
    for path in sorted(Path(directory).rglob("*.pt")):
        client_state = path.name.endswith(_CLIENT_STATE_FILE)
        allowed = DEEPSPEED_GLOBALS.keys() | (LEGACY_RNG_GLOBALS.keys() if client_state else set())
        refused = set(_unsafe_globals(path)) - allowed
        if refused:
            raise UnsafeCheckpoint(f"{path} holds a pickled {', '.join(sorted(refused))}: {REFUSAL}")


@contextlib.contextmanager
def _judged_by_our_lists_alone():
    """Other libraries add to torch's process-wide allow-list (transformers and accelerate add numpy's array
    globals for their RNG states): the scan judges by fastlm's lists alone, whatever was imported before."""
    added = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.add_safe_globals(added)


def _unsafe_globals(path):
    """The globals the pickle in `path` names beyond torch's weights-only defaults."""
    try:
        with _judged_by_our_lists_alone():
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:
        # torch's legacy (non-zip) format ("checkpoint_serialization": false), which the opcode reader does
        # not take: a weights-only load checks it instead, running nothing either.
        _load_weights_only(path, map_location="cpu")
        return []
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        # An opcode the weights-only loader does not take (e.g. protocol 4's STACK_GLOBAL), or a broken file.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsafeCheckpoint(f"{path} holds a pickle fastlm cannot check ({reason}): {REFUSAL}") from None


_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_active = False  # weights_only_loads() nests (the engine's load runs inside the runner's)


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load loads weights-only with the allow-lists, even where DeepSpeed passes
    weights_only=False itself (ds_to_universal, the universal-checkpoint loader); a refused object
    raises UnsafeCheckpoint. Wrap the universal conversion and engine.load_checkpoint in it."""
    global _active
    if _active:
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[_FORCE] = "1"  # torch reads it on every call, and it overrides an explicit weights_only=False
    _active = True
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in
                                               {**DEEPSPEED_GLOBALS, **LEGACY_RNG_GLOBALS}.items()]):
            yield
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(f"a checkpoint file holds a pickled {_refused_global(error)}: {REFUSAL}") from None
    finally:
        _active = False
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _refused_global(error):
    """What torch's weights-only unpickler refused, from its message (a global, or a type it would build)."""
    found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(error))
    return next(name for name in found.groups() if name) if found else "object the weights-only loader refuses"


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True: a refused object raises
    UnsafeCheckpoint naming the file. Saving is unchanged."""

    def load(self, path, map_location=None):
        return _load_weights_only(path, map_location)


def _load_weights_only(path, map_location):
    with weights_only_loads():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpoint(f"{path} holds a pickled {_refused_global(error)}: {REFUSAL}") from None


def install_safe_checkpoint_engine(engine):
    """Make `engine` (from deepspeed.initialize) load its checkpoints with SafeCheckpointEngine."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        # The others (a checkpoint "writer", datastates) load with torch.load(weights_only=False) too.
        raise UnsafeCheckpoint(f"the DeepSpeed configuration selects {type(engine.checkpoint_engine).__name__}, "
                               "which loads checkpoints unsafely; remove checkpoint.writer / datastates from it")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def rng_state():
    """Python's, numpy's, torch's (and CUDA's) RNG states as tensors and plain containers: loadable
    weights-only with no allow-list."""
    numpy_state = np.random.get_state(legacy=False)
    key = numpy_state["state"]["key"]
    state = {"python": random.getstate(),
             "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": torch.from_numpy(key.astype(np.int64))}},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() saved, or the previous release's state (numpy's as a tuple of numpy objects)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"].numpy().astype(np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def from_pretrained(auto_class, name_or_path, **kwargs):
    """auto_class.from_pretrained, with transformers' refusal of pickled weights (a pytorch_model.bin that
    holds code) as one line suggesting safetensors instead of its page-long traceback."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(
            f"--model_name_or_path {name_or_path}: its pickled weights (pytorch_model.bin) hold a "
            f"{_refused_global(error)}, which loading would run: {REFUSAL}; use the model saved as safetensors "
            "(model.safetensors, what save_pretrained writes)") from None
