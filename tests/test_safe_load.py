"""fastlm.train.safe_load with a real DeepSpeed engine (one process, CPU, gloo): a pickle planted in any kind
of checkpoint file is refused in one line and never runs; honest checkpoints, and the previous release's,
round-trip exactly."""
import argparse
import contextlib
import copy
import io
import os
import random
import shutil
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from fastlm.train.safe_load import (DEEPSPEED_GLOBALS, LEGACY_RNG_GLOBALS, REFUSAL, SafeCheckpointEngine,
                                    UnsafeCheckpoint, _unsafe_globals, from_pretrained, install_safe_checkpoint_engine,
                                    rng_state, scan_checkpoint, set_rng_state, weights_only_loads)

# The fixture's model: see tests/fixtures/previous_release_checkpoint/README.md
MODEL = dict(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
PREVIOUS_RELEASE = Path(__file__).parent / "fixtures" / "previous_release_checkpoint"


pytestmark = pytest.mark.usefixtures("one_rank_deepspeed")  # conftest.py: one gloo rank, as the runner makes


def make_engine(stage, seed, *, universal=False, scheduler=True):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**MODEL))
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "checkpoint": {"load_universal": universal}}
    schedule = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))) if scheduler else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      lr_scheduler=schedule)
    install_safe_checkpoint_engine(engine)
    return engine


def train_step(engine):
    tokens = torch.arange(16).reshape(2, 8)
    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
    engine.step()


def weights(engine):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # ZeRO-3 partitions them
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def draws():
    return random.random(), np.random.random(), torch.rand(1).item()


def scramble_rngs():
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def snapshot(state):
    """A copy of a state dict, its tensors detached (ZeRO's flat partitions are views deepcopy refuses)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return copy.deepcopy(state)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler, fragment addresses
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def save_honest(engine, directory, tag="step1"):
    """One training step, then a checkpoint with the runner's client state; the draws the RNGs give next."""
    train_step(engine)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": 1, "sample": 4, "rng": rng_state()})
    return draws()


class Payload:
    """Runs `call` on `marker` (creating the file) when unpickled: what a hostile writer plants."""

    def __init__(self, call, marker):
        self.call, self.marker = call, str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",)) if self.call == "system" else (open, (self.marker, "w"))


def plant(path, payload):
    """Add `payload` to what `path` holds, as torch.save writes it (the hashes in fastlm.json could be updated
    too: they catch damage, not a hostile writer)."""
    with weights_only_loads():
        saved = torch.load(path, weights_only=True)
    torch.save({**saved, "planted": payload} if isinstance(saved, dict) else [saved, payload], path)


def refusal(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith(REFUSAL)
    return message


def test_allow_lists_are_pinned():
    assert sorted(DEEPSPEED_GLOBALS) == ["deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                                         "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                         "deepspeed.runtime.zero.config.ZeroStageEnum",
                                         "deepspeed.utils.tensor_fragment.fragment_address"]
    assert sorted(LEGACY_RNG_GLOBALS) == ["numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                                          "numpy.dtype", "numpy.dtypes.UInt32DType", "numpy.ndarray"]


def test_rng_state_loads_weights_only_with_no_allow_list_and_round_trips(tmp_path):
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    scramble_rngs()
    set_rng_state(torch.load(path, weights_only=True))
    assert draws() == expected


def test_a_planted_payload_runs_under_deepspeeds_own_engine(tmp_path):
    """The control: the planted file is live, so the refusals below are what keeps it from running."""
    path, marker = tmp_path / "model_states.pt", tmp_path / "ran"
    torch.save({"module": {}}, path)
    plant(path, Payload("system", marker))
    TorchCheckpointEngine().load(str(path))
    assert marker.exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_honest_checkpoint_round_trips_exactly(tmp_path, stage):
    engine = make_engine(stage, seed=0)
    expected_draws = save_honest(engine, tmp_path)
    expected_weights = weights(engine)
    expected_optimizer = snapshot(engine.optimizer.state_dict())
    expected_scheduler = snapshot(engine.lr_scheduler.state_dict())
    for path in tmp_path.rglob("*.pt"):  # fastlm's own part (the RNG state) needs no allow-list
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= DEEPSPEED_GLOBALS.keys(), path

    scan_checkpoint(tmp_path / "step1")
    resumed = make_engine(stage, seed=1)
    assert not torch.equal(weights(resumed)["transformer.wte.weight"], expected_weights["transformer.wte.weight"])
    scramble_rngs()
    with weights_only_loads():
        _, client_state = resumed.load_checkpoint(str(tmp_path), tag="step1")
    set_rng_state(client_state["rng"])

    assert draws() == expected_draws
    assert (client_state["step"], client_state["sample"]) == (1, 4)
    assert_same(weights(resumed), expected_weights, "weights")
    assert_same(resumed.optimizer.state_dict(), expected_optimizer, "optimizer")
    assert_same(resumed.lr_scheduler.state_dict(), expected_scheduler, "lr_scheduler")


@pytest.mark.parametrize("stage, pattern, call", [(0, "*model_states.pt", "system"), (0, "*model_states.pt", "open"),
                                                  (1, "*optim_states.pt", "system"), (2, "*optim_states.pt", "system"),
                                                  (3, "*optim_states.pt", "system"), (3, "*model_states.pt", "open")])
def test_a_payload_planted_in_a_checkpoint_is_refused_and_never_runs(tmp_path, stage, pattern, call):
    ckpt_dir, marker = tmp_path / "checkpoints", tmp_path / "ran"
    save_honest(make_engine(stage, seed=0), ckpt_dir)
    (target,) = (ckpt_dir / "step1").glob(pattern)
    plant(target, Payload(call, marker))
    global_name = "posix.system" if call == "system" else "io.open"  # os.system, open

    with pytest.raises(UnsafeCheckpoint) as error:
        scan_checkpoint(ckpt_dir / "step1")
    assert refusal(error) == f"{target} holds a pickled {global_name}: {REFUSAL}"
    # Behind the scan, the engine's own loads refuse it too.
    resumed = make_engine(stage, seed=1)
    with pytest.raises(UnsafeCheckpoint) as error, weights_only_loads():
        resumed.load_checkpoint(str(ckpt_dir), tag="step1")
    assert refusal(error) == f"{target} holds a pickled {global_name}: {REFUSAL}"
    assert not marker.exists()


def to_universal(ckpt_dir, tag):
    """The conversion fastlm runs when the rank count changes (fastlm's universal_if_resharded)."""
    options = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(ckpt_dir / f"{tag}_universal"),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():
        ds_to_universal.main(options)
    return f"{tag}_universal"


@pytest.mark.parametrize("stage", [1, 3])
def test_a_universal_checkpoint_round_trips_and_refuses_a_planted_payload(tmp_path, stage):
    engine = make_engine(stage, seed=0)
    save_honest(engine, tmp_path)
    expected_weights = weights(engine)
    universal = to_universal(tmp_path, "step1")
    scan_checkpoint(tmp_path / universal)
    resumed = make_engine(stage, seed=1, universal=True)
    with weights_only_loads():
        _, client_state = resumed.load_checkpoint(str(tmp_path), tag=universal)
    assert client_state["step"] == 1
    assert_same(weights(resumed), expected_weights, "weights")

    marker = tmp_path / "ran"
    for target in (tmp_path / universal / "zero" / "optimizer_state.pt",
                   tmp_path / universal / "zero" / "transformer.wte.weight" / "fp32.pt"):
        honest = target.read_bytes()
        plant(target, Payload("system", marker))
        with pytest.raises(UnsafeCheckpoint) as error:
            scan_checkpoint(tmp_path / universal)
        assert refusal(error) == f"{target} holds a pickled posix.system: {REFUSAL}"
        with pytest.raises(UnsafeCheckpoint) as error, weights_only_loads():  # DeepSpeed's own torch.load calls
            make_engine(stage, seed=1, universal=True).load_checkpoint(str(tmp_path), tag=universal)
        assert refusal(error) == f"a checkpoint file holds a pickled posix.system: {REFUSAL}"
        target.write_bytes(honest)
    assert not marker.exists()


def test_converting_a_planted_checkpoint_to_universal_never_runs_it(tmp_path):
    save_honest(make_engine(1, seed=0), tmp_path)
    marker = tmp_path / "ran"
    plant(next((tmp_path / "step1").glob("*optim_states.pt")), Payload("system", marker))
    with pytest.raises(UnsafeCheckpoint) as error:
        to_universal(tmp_path, "step1")
    assert refusal(error) == f"a checkpoint file holds a pickled posix.system: {REFUSAL}"
    assert not marker.exists()


def test_a_previous_release_checkpoint_resumes(tmp_path):
    ckpt_dir = shutil.copytree(PREVIOUS_RELEASE, tmp_path / "checkpoints")
    (model_states,) = (ckpt_dir / "step1").glob("*model_states.pt")
    assert "numpy.ndarray" in _unsafe_globals(model_states)
    scan_checkpoint(ckpt_dir / "step1")
    resumed = make_engine(1, seed=0, scheduler=False)  # as the fixture was saved
    scramble_rngs()
    with weights_only_loads():
        _, client_state = resumed.load_checkpoint(str(ckpt_dir), tag="step1")
    set_rng_state(client_state["rng"])
    # The draws the RNGs gave right after that checkpoint was saved (the fixture's README).
    assert draws() == (0.13436424411240122, 0.417022004702574, 0.7914451360702515)
    assert (client_state["step"], client_state["sample"]) == (1, 2)
    with weights_only_loads():
        saved = torch.load(model_states, weights_only=True)["module"]
    assert_same(weights(resumed), {name: saved[name] for name in weights(resumed)}, "weights")


def test_numpy_objects_are_allowed_only_where_the_previous_release_saved_them(tmp_path):
    ckpt_dir = shutil.copytree(PREVIOUS_RELEASE, tmp_path / "checkpoints")
    (optim_states,) = (ckpt_dir / "step1").glob("*optim_states.pt")
    plant(optim_states, np.zeros(3))
    with pytest.raises(UnsafeCheckpoint) as error:
        scan_checkpoint(ckpt_dir / "step1")
    assert refusal(error).startswith(f"{optim_states} holds a pickled numpy.")


def test_a_pickle_the_scan_cannot_read_is_refused(tmp_path):
    path = tmp_path / "step1" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}}, path, pickle_protocol=4)  # STACK_GLOBAL: not weights-only pickle
    with pytest.raises(UnsafeCheckpoint) as error:
        scan_checkpoint(path.parent)
    assert refusal(error).startswith(f"{path} holds a pickle fastlm cannot check (")


def test_a_payload_in_torchs_legacy_format_is_refused_and_never_runs(tmp_path):
    """DeepSpeed writes it with "checkpoint_serialization": false; the opcode scan does not read it."""
    path, marker = tmp_path / "step1" / "mp_rank_00_model_states.pt", tmp_path / "ran"
    path.parent.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "rng": rng_state()}, path, _use_new_zipfile_serialization=False)
    scan_checkpoint(path.parent)
    assert torch.equal(SafeCheckpointEngine().load(str(path))["module"]["w"], torch.ones(2))
    torch.save({"module": {}, "planted": Payload("system", marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpoint) as error:
        scan_checkpoint(path.parent)
    assert refusal(error) == f"{path} holds a pickled posix.system: {REFUSAL}"
    assert not marker.exists()


def test_pickled_pretrained_weights_that_transformers_refuses_give_one_line(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(**MODEL))
    model.config.save_pretrained(tmp_path)
    # What save_pretrained(safe_serialization=False) wrote; transformers 5 writes only safetensors.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    honest = from_pretrained(AutoModelForCausalLM, str(tmp_path))
    assert torch.equal(honest.transformer.wte.weight, model.transformer.wte.weight)

    marker = tmp_path / "ran"
    plant(tmp_path / "pytorch_model.bin", Payload("system", marker))
    with pytest.raises(UnsafeCheckpoint) as error:
        from_pretrained(AutoModelForCausalLM, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--model_name_or_path {tmp_path}: its pickled weights (pytorch_model.bin) hold a "
                              "posix.system")
    assert "safetensors" in message
    assert not marker.exists()
