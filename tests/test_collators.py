import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastlm import DataCollatorForCLM, DataCollatorForMLM  # noqa: E402
from fastlm.masking import IGNORE_INDEX  # noqa: E402
from tests.data import wikitext_lines  # noqa: E402


@pytest.fixture(scope="module")
def lines():
    return [line for line in wikitext_lines("valid")[:600] if line.strip()][:96]


def features_of(tok, lines, max_length=48, **kwargs):
    enc = tok(lines, truncation=True, max_length=max_length, **kwargs)
    return [{k: enc[k][i] for k in enc} for i in range(len(lines))]


def check_against_hf_padding(ours, hf, special_ids):
    """Same keys, dtypes and shapes as HF; unmasked positions hold HF's padded ids; targets are real tokens."""
    assert set(ours) == set(hf)
    for key in hf:
        assert ours[key].dtype == hf[key].dtype == torch.int64, key
        assert ours[key].shape == hf[key].shape, key
    assert torch.equal(ours["attention_mask"], hf["attention_mask"])
    targets = ours["labels"] != IGNORE_INDEX
    # HF masks the same way, so its input_ids differ at its own targets: compare padded ids via its labels.
    hf_original = torch.where(hf["labels"] != IGNORE_INDEX, hf["labels"], hf["input_ids"])
    assert torch.equal(ours["input_ids"][~targets], hf_original[~targets])
    assert torch.equal(ours["labels"][targets], hf_original[targets])
    assert not torch.isin(ours["labels"][targets], torch.tensor(special_ids)).any()
    assert (ours["attention_mask"][targets] == 1).all()
    return targets


@pytest.mark.parametrize("tokenizer_fixture", ["roberta_tok", "bert_tok"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_mlm_collator_is_a_drop_in_for_hf(request, lines, tokenizer_fixture, pad_to_multiple_of):
    tok = request.getfixturevalue(tokenizer_fixture)
    features = features_of(tok, lines[:16], return_special_tokens_mask=True)
    hf = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15, pad_to_multiple_of=pad_to_multiple_of)
    ours = DataCollatorForMLM(tok, mlm_probability=0.15, pad_to_multiple_of=pad_to_multiple_of, seed=0)
    out = ours([dict(f) for f in features])
    targets = check_against_hf_padding(out, hf([dict(f) for f in features]), tok.all_special_ids)
    assert 0 < targets.sum() < out["attention_mask"].sum()
    if pad_to_multiple_of:
        assert out["input_ids"].shape[1] % pad_to_multiple_of == 0
    if tokenizer_fixture == "bert_tok":
        assert "token_type_ids" in out


def test_mlm_collator_accepts_bare_id_lists_and_left_padding(roberta_tok, lines):
    rows = roberta_tok(lines[:8], truncation=True, max_length=40)["input_ids"]
    out = DataCollatorForMLM(roberta_tok, seed=0)(rows)
    hf = transformers.DataCollatorForLanguageModeling(roberta_tok)(rows)
    assert set(out) == set(hf) == {"input_ids", "labels"}
    assert out["input_ids"].shape == hf["input_ids"].shape
    padding = out["input_ids"] == roberta_tok.pad_token_id
    assert (out["labels"][padding] == IGNORE_INDEX).all() and padding.any()

    roberta_tok.padding_side = "left"
    try:
        features = features_of(roberta_tok, lines[:8], max_length=40)
        out = DataCollatorForMLM(roberta_tok, seed=0)(features)
        hf = transformers.DataCollatorForLanguageModeling(roberta_tok)(features_of(roberta_tok, lines[:8], max_length=40))
        assert torch.equal(out["attention_mask"], hf["attention_mask"])
        assert (out["attention_mask"][:, -1] == 1).all()
    finally:
        roberta_tok.padding_side = "right"


def test_special_tokens_mask_from_features_is_honoured(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:32], return_special_tokens_mask=True)
    for f in features:
        f["special_tokens_mask"] = [1] * len(f["input_ids"])  # every token declared special
    out = DataCollatorForMLM(roberta_tok, mlm_probability=1.0, seed=0, return_tensors="np")(features)
    assert "special_tokens_mask" not in out
    assert (out["labels"] == IGNORE_INDEX).all()


def test_mlm_masks_are_reproducible_per_batch_and_epoch(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:8])
    first = DataCollatorForMLM(roberta_tok, seed=5)
    second = DataCollatorForMLM(roberta_tok, seed=5)
    a, b = first(features), second(features)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(first(features)["labels"], a["labels"])  # the next batch index
    first.set_epoch(1)
    assert not torch.equal(first(features)["labels"], a["labels"])
    first.set_epoch(0)
    assert torch.equal(first(features)["labels"], a["labels"])


def test_ranks_take_interleaved_global_batch_indices(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:8], max_length=32)
    reference = DataCollatorForMLM(roberta_tok, seed=4, return_tensors="np")
    batches = [reference(features)["labels"] for _ in range(4)]  # global batches 0..3
    for rank in (0, 1):
        collator = DataCollatorForMLM(roberta_tok, seed=4, rank=rank, world_size=2, return_tensors="np")
        assert (collator(features)["labels"] == batches[rank]).all()
        assert (collator(features)["labels"] == batches[2 + rank]).all()
    with pytest.raises(ValueError, match="rank"):
        DataCollatorForMLM(roberta_tok, rank=2, world_size=2)


def test_fixed_collator_masks_each_example_the_same_in_any_batch(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:12])
    collator = DataCollatorForMLM(roberta_tok, seed=1, fixed=True, return_tensors="np")
    whole = collator(features)
    part = collator(features[4:7])
    n = part["labels"].shape[1]
    assert (whole["labels"][4:7, :n] == part["labels"]).all()
    assert (whole["labels"][4:7, n:] == IGNORE_INDEX).all()


@pytest.fixture(scope="module")
def worker_batches(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:40], max_length=32)
    collator = DataCollatorForMLM(roberta_tok, seed=3)

    def run(num_workers):
        loader = torch.utils.data.DataLoader(features, batch_size=4, collate_fn=collator, num_workers=num_workers,
                                             multiprocessing_context="fork" if num_workers else None)
        return [batch["labels"] for batch in loader]

    return run


def test_same_masks_with_0_1_2_dataloader_workers(worker_batches):
    reference = worker_batches(0)
    assert len(reference) == 10
    for num_workers in (1, 2):
        batches = worker_batches(num_workers)
        assert len(batches) == len(reference)
        assert all(torch.equal(a, b) for a, b in zip(batches, reference)), num_workers
    assert not torch.equal(reference[0][:, :8], reference[1][:, :8])


def test_trainer_trains_a_tiny_roberta_with_our_collator(roberta_tok, lines, tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50265, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80)
    model = RobertaForMaskedLM(config)
    train = features_of(roberta_tok, lines[:64], max_length=32, return_special_tokens_mask=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    collator = DataCollatorForMLM(roberta_tok, mlm_probability=0.15, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[collator.trainer_callback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3
    # 64 examples / 8 per step: 16 steps are two epochs; the callback numbered the second one 1, and
    # restarted the batch count there.
    assert collator.epoch == 1 and collator._calls == 8


# --- causal LM ---------------------------------------------------------------------------------------

def test_clm_labels_follow_attention_not_the_pad_id(gpt2_tok, lines):
    eos = gpt2_tok.eos_token_id
    features = features_of(gpt2_tok, lines[:6], max_length=24)
    for f in features:
        f["input_ids"] = f["input_ids"] + [eos]
        f["attention_mask"] = f["attention_mask"] + [1]
    collator = DataCollatorForCLM(gpt2_tok)  # no pad token: pads with EOS
    out = collator(features)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["labels"].dtype == torch.int64
    real = out["attention_mask"] == 1
    assert torch.equal(out["labels"][real], out["input_ids"][real])
    assert (out["labels"][~real] == IGNORE_INDEX).all() and (~real).any()
    # The appended EOS keeps its label, though it equals the padding id (transformers #23530).
    lengths = real.sum(dim=1)
    assert all(out["labels"][i, lengths[i] - 1] == eos for i in range(len(features)))


def test_clm_padding_free_matches_hf_flattening_per_example(gpt2_tok, lines):
    features = features_of(gpt2_tok, lines[:10], max_length=30)
    ours = DataCollatorForCLM(gpt2_tok, padding_free=True, return_flash_attn_kwargs=True)(features)
    hf = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(
        [{"input_ids": f["input_ids"]} for f in features])
    assert ours["input_ids"].shape == hf["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert ours["position_ids"].dtype == torch.int64 and ours["labels"].dtype == torch.int64

    def segments(batch):
        cu = batch["cu_seq_lens_q"].tolist()
        return sorted(
            tuple(tuple(batch[k][0, a:b].tolist()) for k in ("input_ids", "labels", "position_ids"))
            for a, b in zip(cu[:-1], cu[1:])
        )

    assert segments(ours) == segments(hf)
    assert ours["max_length_q"] == ours["max_length_k"] == hf["max_length_q"]
    assert torch.equal(ours["cu_seq_lens_q"], ours["cu_seq_lens_k"])


def test_bad_input_raises_clear_errors(gpt2_tok, roberta_tok, lines):
    with pytest.raises(ValueError, match="no mask id"):
        DataCollatorForMLM(gpt2_tok)
    with pytest.raises(ValueError, match="mlm_probability"):
        DataCollatorForMLM(roberta_tok, mlm_probability=1.5)
    with pytest.raises(ValueError, match="return_tensors"):
        DataCollatorForMLM(roberta_tok, return_tensors="tf")
    with pytest.raises(ValueError, match="empty"):
        DataCollatorForMLM(roberta_tok)([])
    ragged = features_of(gpt2_tok, lines[:4])
    with pytest.raises(ValueError, match="no pad token"):
        DataCollatorForCLM(pad_id=None)(ragged)
    same_length = [{"input_ids": f["input_ids"][:3]} for f in ragged]
    assert DataCollatorForCLM(pad_id=None)(same_length)["labels"].shape == (4, 3)  # nothing to pad: fine
    with pytest.raises(ValueError, match="outside the vocabulary"):
        DataCollatorForMLM(roberta_tok)([{"input_ids": [0, 70000, 2]}])
    with pytest.raises(TypeError, match="'input_ids' must hold integer ids"):
        DataCollatorForMLM(roberta_tok)([{"input_ids": [0, 1.5, 2]}])


def test_tensor_and_array_rows_collate_like_lists(roberta_tok, lines):
    """A dataset with a torch or numpy format hands the collator tensors instead of lists."""
    features = features_of(roberta_tok, lines[:6], max_length=30)
    expected = DataCollatorForMLM(roberta_tok, seed=2)(features)
    for convert in (torch.tensor, np.array):
        converted = [{k: convert(v) for k, v in f.items()} for f in features]
        out = DataCollatorForMLM(roberta_tok, seed=2)(converted)
        assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_clm_bare_id_lists_get_no_labels_on_padding():
    batch = DataCollatorForCLM(pad_id=0, return_tensors="np")([[5, 6, 7], [8]])
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = DataCollatorForCLM(pad_id=0, return_tensors="np")
    left.padding_side = "left"
    assert left([[5, 6, 7], [8]])["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]


def test_features_whose_lengths_disagree_are_refused():
    collator = DataCollatorForCLM(pad_id=0, return_tensors="np")
    with pytest.raises(ValueError, match="'labels' of example 0 has 4 entries but its input_ids has 2"):
        collator([{"input_ids": [1, 2], "labels": [1, 2, 3, 9]}, {"input_ids": [5], "labels": [5]}])


def test_clm_padding_free_uses_given_labels_like_hf():
    transformers = pytest.importorskip("transformers")
    features = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3, 4, 5], "labels": [-100, -100, 5]}]
    ours = DataCollatorForCLM(pad_id=0, padding_free=True, return_tensors="np")(features)
    hf = transformers.DataCollatorWithFlattening(return_tensors="np")(features)
    assert ours["labels"].tolist() == np.asarray(hf["labels"]).tolist() == [[-100, 2, -100, -100, 5]]
    assert ours["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
