import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastlm  # noqa: E402
from fastlm import DataCollatorForCLM, DataCollatorForMLM  # noqa: E402
from fastlm.packing import IGNORE_INDEX  # noqa: E402
from tests.data import wikitext_lines  # noqa: E402


@pytest.fixture(scope="module")
def lines():
    return [line for line in wikitext_lines("valid")[:600] if line.strip()][:96]


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory):
    """transformers' test tokenizer: a WordPiece vocabulary of the five specials only."""
    path = tmp_path_factory.mktemp("toy") / "vocab.txt"
    path.write_text("".join(token + "\n" for token in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]))
    return transformers.BertTokenizerFast(str(path))


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


def test_unk_in_text_is_maskable_when_the_features_say_so(bert_tok):
    """Issue 9 item 5: the tokenizer's special_tokens_mask marks only [CLS]/[SEP]; an [UNK] inside the text
    is an ordinary target for transformers. Without the mask, get_special_tokens_mask's rule (every special
    id) applies."""
    text = ["hello \u2603 world \u2603 again"]  # the snowman is not in BERT's vocabulary: [UNK]
    with_mask = features_of(bert_tok, text, return_special_tokens_mask=True)
    assert with_mask[0]["input_ids"].count(bert_tok.unk_token_id) == 2
    collator = DataCollatorForMLM(bert_tok, mlm_probability=1.0, seed=0, return_tensors="np")
    labels = collator(with_mask)["labels"][0]
    ids = np.array(with_mask[0]["input_ids"])
    assert (labels[ids == bert_tok.unk_token_id] == bert_tok.unk_token_id).all()
    assert (labels[[0, -1]] == IGNORE_INDEX).all()  # [CLS], [SEP]
    hf_special = bert_tok.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True)
    without_mask = collator([{"input_ids": with_mask[0]["input_ids"]}])["labels"][0]
    assert ((without_mask != IGNORE_INDEX) == (np.array(hf_special) == 0)).all()


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


# --- new masks every epoch, reproducible, with any DataLoader ------------------------------------------------

def epoch_labels(collator, features, num_workers, persistent=False, epochs=2, set_epoch=False):
    """Labels of every batch of each epoch, from one DataLoader reused across epochs (as Trainer does)."""
    loader = torch.utils.data.DataLoader(
        features, batch_size=4, collate_fn=collator, num_workers=num_workers,
        persistent_workers=persistent, multiprocessing_context="fork" if num_workers else None)
    out = []
    for epoch in range(epochs):
        if set_epoch:
            collator.set_epoch(epoch)
        out.append([batch["labels"] for batch in loader])
    return out


@pytest.fixture(scope="module")
def same_rows(roberta_tok, lines):
    """20 copies of one example: a batch's masks then depend on its stream only, never on which rows it got."""
    return features_of(roberta_tok, lines[:1], max_length=32) * 20


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (1, False), (2, False), (1, True), (2, True)])
def test_new_masks_every_epoch_reproducibly_without_set_epoch(roberta_tok, same_rows, num_workers, persistent):
    """Issue 9 item 1: non-persistent workers start each epoch from a fresh copy of the collator; they
    used to restart its batch count and repeat epoch 1's masks."""
    run = epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, num_workers, persistent)
    assert len(run[0]) == 5
    assert not any(torch.equal(a, b) for a, b in zip(run[0], run[1]))
    again = epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, num_workers, persistent)
    assert all(same(a, b) for a, b in zip(run, again))


def test_first_epoch_and_set_epoch_masks_do_not_depend_on_the_worker_count(roberta_tok, same_rows):
    reference = epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, 0)
    keyed = epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, 0, set_epoch=True)
    assert same(reference[0], keyed[0]) and not same(reference[1], keyed[1])
    for num_workers in (1, 2):
        assert same(epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, num_workers)[0], reference[0])
        assert all(same(a, b) for a, b in zip(
            epoch_labels(DataCollatorForMLM(roberta_tok, seed=3), same_rows, num_workers, set_epoch=True), keyed))


def test_seed_none_follows_the_global_rngs(roberta_tok, same_rows):
    """Issue 9 item 2: without a seed, masks come from torch's global RNG (numpy's for "np"), as
    transformers' do, so transformers.set_seed reproduces them; they used to come from the OS."""
    def run(seed, return_tensors="pt"):
        transformers.set_seed(seed)
        collator = DataCollatorForMLM(roberta_tok, return_tensors=return_tensors)
        return [collator(same_rows[:4])["labels"] for _ in range(3)]

    first = run(7)
    assert same(first, run(7)) and not same(first, run(8))
    assert not torch.equal(first[0], first[1])
    as_np = run(7, "np")
    assert all((a == b).all() for a, b in zip(as_np, run(7, "np")))


class LabelRecorder(torch.nn.Module):
    """The smallest model Trainer will train: it keeps the labels of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        self.seen.append(labels.clone())
        return {"loss": (self.weight - 1).pow(2).sum()}


def trainer_epochs(tmp_path, collator, features, num_workers, persistent=False, seed=0):
    from transformers import Trainer, TrainingArguments

    model = LabelRecorder()
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             dataloader_num_workers=num_workers, dataloader_persistent_workers=persistent,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=seed, dataloader_pin_memory=False)
    Trainer(model=model, args=args, train_dataset=features, data_collator=collator).train()
    half = len(model.seen) // 2
    return model.seen[:half], model.seen[half:]


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)])
def test_trainer_without_callback_gets_new_reproducible_masks_each_epoch(tmp_path, roberta_tok, same_rows,
                                                                           num_workers, persistent):
    first, second = trainer_epochs(tmp_path, DataCollatorForMLM(roberta_tok), same_rows[:16], num_workers, persistent)
    assert len(first) == len(second) == 4
    assert not any(torch.equal(a, b) for a, b in zip(first, second))
    # Trainer seeds torch with args.seed: the run repeats exactly, another seed gives other masks.
    again = trainer_epochs(tmp_path, DataCollatorForMLM(roberta_tok), same_rows[:16], num_workers, persistent)
    assert same(first + second, again[0] + again[1])
    if num_workers == 0:
        other = trainer_epochs(tmp_path, DataCollatorForMLM(roberta_tok), same_rows[:16], 0, seed=1)
        assert not same(first, other[0])


def test_trainer_trains_saves_the_tokenizer_and_the_model_loads(roberta_tok, lines, tmp_path):
    """Issue 9 item 3: with no processing_class, Trainer saves data_collator.tokenizer beside the model."""
    from transformers import (AutoModelForMaskedLM, AutoTokenizer, RobertaConfig, RobertaForMaskedLM, Trainer,
                              TrainingArguments)

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
    trainer.save_model(str(tmp_path / "model"))
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("Hello world")["input_ids"] == [0, 31414, 232, 2]
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "model").config.vocab_size == 50265


# --- the transformers signature and attributes --------------------------------------------------------------

def test_constructor_arguments_and_attributes_match_transformers(roberta_tok):
    """Issue 9 items 3-4: same arguments in the same order, the public attributes transformers' collator has."""
    names = ["tokenizer", "mlm", "whole_word_mask", "mlm_probability", "mask_replace_prob", "random_replace_prob",
             "pad_to_multiple_of", "return_tensors", "seed"]
    import warnings

    for kwargs in ({}, dict(mlm_probability=0.3, pad_to_multiple_of=8, return_tensors="np", seed=4),
                   dict(whole_word_mask=True), dict(mlm=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers warns that whole words force mask_replace_prob=1
            hf = transformers.DataCollatorForLanguageModeling(roberta_tok, **kwargs)
        ours = DataCollatorForMLM(roberta_tok, **kwargs)
        assert {name: getattr(ours, name) for name in names} == {name: getattr(hf, name) for name in names}, kwargs
    positional = DataCollatorForMLM(roberta_tok, False, False, 0.2, 0.7, 0.2, 4, "np", 9)
    assert (positional.mlm, positional.mlm_probability, positional.mask_replace_prob, positional.random_replace_prob,
            positional.pad_to_multiple_of, positional.return_tensors, positional.seed) == (
        False, 0.2, 0.7, 0.2, 4, "np", 9)
    assert fastlm.DataCollatorForLanguageModeling is DataCollatorForMLM
    with pytest.raises(TypeError, match="the second positional argument is mlm"):
        DataCollatorForMLM(roberta_tok, 0.15)
    with pytest.raises(ValueError, match="whole_word_mask needs mlm=True"):
        DataCollatorForMLM(roberta_tok, mlm=False, whole_word_mask=True)


def test_mlm_false_and_clm_give_causal_batches_and_return_tensors_per_call(gpt2_tok, roberta_tok, lines):
    features = features_of(roberta_tok, lines[:4], max_length=20)
    for collator in (DataCollatorForMLM(roberta_tok, mlm=False), DataCollatorForMLM(roberta_tok, False),
                     DataCollatorForCLM(roberta_tok, mlm=False), DataCollatorForCLM(roberta_tok, False)):
        batch = collator(features, return_tensors="np")
        assert isinstance(batch["labels"], np.ndarray)
        real = batch["attention_mask"] == 1
        assert (batch["labels"][real] == batch["input_ids"][real]).all() and (batch["labels"][~real] == -100).all()
        assert isinstance(collator(features)["labels"], torch.Tensor)
    assert isinstance(DataCollatorForMLM(roberta_tok, seed=0)(features, return_tensors="np")["labels"], np.ndarray)
    with pytest.raises(ValueError, match="use DataCollatorForMLM"):
        DataCollatorForCLM(gpt2_tok, mlm=True)


def test_changed_attributes_take_effect(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:4], max_length=24)
    collator = DataCollatorForMLM(roberta_tok, seed=0, return_tensors="np")
    collator.mlm_probability = 1.0
    collator.mask_replace_prob, collator.random_replace_prob = 1.0, 0.0
    batch = collator(features)
    eligible = (batch["attention_mask"] == 1) & ~np.isin(batch["labels"], [-100])
    assert eligible.sum() == sum(len(f["input_ids"]) - 2 for f in features)
    assert (batch["input_ids"][eligible] == roberta_tok.mask_token_id).all()
    collator.pad_to_multiple_of = 32
    assert collator(features)["input_ids"].shape[1] == 32


def test_collator_pickles_for_spawned_workers(roberta_tok, lines):
    features = features_of(roberta_tok, lines[:4], max_length=24)
    collator = DataCollatorForMLM(roberta_tok, seed=2, return_tensors="np")
    expected = collator(features)["labels"]
    copy = pickle.loads(pickle.dumps(DataCollatorForMLM(roberta_tok, seed=2, return_tensors="np")))
    assert (copy(features)["labels"] == expected).all()


# --- random replacements and ids -----------------------------------------------------------------------------

def test_random_replacements_come_from_transformers_vocabulary_by_default(toy_tok):
    """Issue 9 items 7 and the random vocabulary: like transformers, random ids are drawn below
    len(tokenizer), specials included; a vocabulary of specials only works; ids past the tokenizer's
    length are ordinary tokens."""
    features = [{"input_ids": list(range(5, 505))}] * 4
    collator = DataCollatorForMLM(toy_tok, mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=1.0,
                                  seed=0, return_tensors="np")
    batch = collator(features)
    assert (batch["labels"] == np.array(features[0]["input_ids"])).all()
    assert set(np.unique(batch["input_ids"]).tolist()) == set(range(len(toy_tok)))
    with pytest.raises(ValueError, match="no id to draw random replacements from: pass random_replace_prob=0"):
        DataCollatorForMLM(toy_tok, random_ids="non_special")


def test_non_special_random_ids_option(roberta_tok):
    collator = DataCollatorForMLM(roberta_tok, mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=1.0,
                                  seed=0, random_ids="non_special", return_tensors="np")
    batch = collator([{"input_ids": [0] + [1000] * 510 + [2]}] * 64)
    drawn = batch["input_ids"][:, 1:-1]
    assert not np.isin(drawn, roberta_tok.all_special_ids).any() and drawn.max() < len(roberta_tok)


def test_ids_no_model_could_take_are_refused(toy_tok):
    collator = DataCollatorForMLM(toy_tok, seed=0)
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = -5 is not a token id of any model"):
        collator([{"input_ids": [1, -5, 7]}])
    with pytest.raises(ValueError, match=r"= 16777216 is not a token id of any model"):
        collator([{"input_ids": [1, 2**24, 7]}])


# --- whole words ---------------------------------------------------------------------------------------------

def hf_words(enc, r):
    word_ids, _ = transformers.DataCollatorForLanguageModeling._calc_word_ids_and_prob_mask(
        np.asarray(enc["offset_mapping"]), np.asarray(enc["special_tokens_mask"]))
    return word_ids[r]


def test_wordpiece_whole_words_follow_transformers_boundaries(bert_tok, lines):
    """Issue 9 item 6: with offsets, punctuation glued to a word ("word,") belongs to it, as in
    transformers; the vocabulary table alone splits it off."""
    enc = bert_tok(lines[:24], truncation=True, max_length=96, padding="max_length", return_offsets_mapping=True,
                   return_special_tokens_mask=True)
    features = [{k: enc[k][i] for k in enc} for i in range(24)]
    collator = DataCollatorForMLM(bert_tok, whole_word_mask=True, mlm_probability=0.3, seed=0, return_tensors="np")
    glued_words_selected = 0
    for _ in range(3):
        targets = collator(features)["labels"] != IGNORE_INDEX
        for r in range(len(features)):
            words = hf_words(enc, r)
            for word in np.unique(words[words >= 0]):
                flags = targets[r][words == word]
                assert flags.all() or not flags.any()
                glued_words_selected += bool(flags.all()) and len(set(
                    bert_tok.convert_ids_to_tokens(np.asarray(enc["input_ids"][r])[words == word])) & {",", "."}) > 0
    assert glued_words_selected > 5


def sentencepiece_tokenizer(lines):
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(lines, vocab_size=400, special_tokens=["<unk>", "<pad>", "<mask>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   mask_token="<mask>")


def test_sentencepiece_whole_words_and_tokenizers_without_word_marks(lines, toy_tok):
    sp_tok = sentencepiece_tokenizer(lines)
    collator = DataCollatorForMLM(sp_tok, whole_word_mask=True, mlm_probability=0.3, seed=0, return_tensors="np")
    assert collator.masker.whole_word == "sentencepiece"
    enc = sp_tok(lines[:16], truncation=True, max_length=64)
    batch = collator([{"input_ids": ids} for ids in enc["input_ids"]])
    tokens = [sp_tok.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
    multi_piece = 0
    for r, row in enumerate(tokens):
        starts = [i for i, t in enumerate(row) if t.startswith("\u2581")] + [len(row)]
        for a, b in zip(starts[:-1], starts[1:]):
            flags = batch["labels"][r][a:b] != IGNORE_INDEX
            assert flags.all() or not flags.any()
            multi_piece += b - a > 1 and flags.all()
    assert multi_piece > 3

    # A vocabulary with no word marks: offsets or word ids are needed, and say so.
    words = DataCollatorForMLM(toy_tok, whole_word_mask=True, mlm_probability=0.5, seed=0, return_tensors="np")
    with pytest.raises(ValueError, match="needs features with offset_mapping"):
        words([{"input_ids": [1, 5, 6, 7, 2]}])
    word_ids = [None, 0, 0, 1, 1, 1, 2, None]
    labels = words([{"input_ids": [1, 5, 6, 7, 8, 9, 10, 2], "word_ids": word_ids}] * 32)["labels"] != IGNORE_INDEX
    for word in (0, 1, 2):
        columns = [i for i, w in enumerate(word_ids) if w == word]
        assert (labels[:, columns].all(axis=1) | ~labels[:, columns].any(axis=1)).all()
    assert labels.any()


# --- causal LM ---------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("kwargs", [
    dict(), dict(return_flash_attn_kwargs=True), dict(return_seq_idx=True), dict(return_position_ids=False),
    dict(separator_id=7, position_ids_start=2, return_flash_attn_kwargs=True, return_seq_idx=True),
])
@pytest.mark.parametrize("with_labels", [False, True])
def test_padding_free_equals_transformers_flattening(kwargs, with_labels):
    """Issue 9 item 4: DataCollatorWithFlattening's arguments, and exactly its output (empty examples
    dropped, each example's first label the separator, position_ids from position_ids_start)."""
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": []}, {"input_ids": [8]}, {"input_ids": [9, 10, 11, 12]}]
    if with_labels:
        for f in features:
            f["labels"] = [-100] + f["input_ids"][1:]
    hf = transformers.DataCollatorWithFlattening(return_tensors="np", **kwargs)(features)
    ours = DataCollatorForCLM(padding_free=True, return_tensors="np", **kwargs)(features)
    assert set(ours) == set(hf)
    for key in hf:
        assert np.asarray(ours[key]).tolist() == np.asarray(hf[key]).tolist(), key
        assert np.asarray(ours[key]).dtype == np.asarray(hf[key]).dtype, key
    call = DataCollatorForCLM(padding_free=True, return_tensors="np")(features, separator_id=3)
    assert call["labels"].tolist() == transformers.DataCollatorWithFlattening(return_tensors="np")(
        features, separator_id=3)["labels"].tolist()


def test_bad_input_raises_clear_errors(gpt2_tok, roberta_tok, lines):
    with pytest.raises(ValueError, match="no mask id"):
        DataCollatorForMLM(gpt2_tok)
    with pytest.raises(ValueError, match="mlm_probability"):
        DataCollatorForMLM(roberta_tok, mlm_probability=1.5)
    with pytest.raises(ValueError, match="return_tensors"):
        DataCollatorForMLM(roberta_tok, return_tensors="tf")
    with pytest.raises(ValueError, match="return_tensors"):
        DataCollatorForMLM(roberta_tok)([{"input_ids": [0, 5, 2]}], return_tensors="tf")
    with pytest.raises(ValueError, match="empty"):
        DataCollatorForMLM(roberta_tok)([])
    ragged = features_of(gpt2_tok, lines[:4])
    with pytest.raises(ValueError, match="no pad token"):
        DataCollatorForCLM(pad_id=None)(ragged)
    same_length = [{"input_ids": f["input_ids"][:3]} for f in ragged]
    assert DataCollatorForCLM(pad_id=None)(same_length)["labels"].shape == (4, 3)  # nothing to pad: fine
    with pytest.raises(TypeError, match="'input_ids' must hold integer ids"):
        DataCollatorForMLM(roberta_tok)([{"input_ids": [0, 1.5, 2]}])


@pytest.mark.parametrize("make", [
    lambda tok: DataCollatorForMLM(tok, pad_to_multiple_of=-8),
    lambda tok: DataCollatorForMLM(tok, mlm=False, pad_to_multiple_of=0),
    lambda tok: DataCollatorForCLM(tok, pad_to_multiple_of=-8),
])
def test_pad_to_multiple_of_must_be_positive(roberta_tok, make):
    """Issue 11 item 14: -8 used to fail inside numpy with "negative dimensions are not allowed"."""
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        make(roberta_tok)


def test_float_ids_and_nulls_are_refused_not_truncated(roberta_tok):
    """Issue 11 item 6: float ids used to be truncated to int without a word (ndarray features for MLM,
    lists for padding-free CLM), and nulls inside rows passed through."""
    mlm = DataCollatorForMLM(roberta_tok, seed=0)
    with pytest.raises(TypeError, match="'input_ids' of example 0 holds float64 values; token ids must be integers"):
        mlm([{"input_ids": np.array([0, 10.7, 2])}])
    with pytest.raises(TypeError, match="'input_ids' of example 0 holds float32 values"):
        mlm([{"input_ids": torch.tensor([0.0, 10.7, 2.0])}])
    flat = DataCollatorForCLM(roberta_tok, padding_free=True)
    with pytest.raises(TypeError, match="'input_ids' must hold integer ids"):
        flat([{"input_ids": [0, 10.7, 2]}])
    with pytest.raises(TypeError, match="'labels' must hold integer ids"):
        flat([{"input_ids": [0, 10, 2], "labels": [0, 10.5, 2]}])
    with pytest.raises(ValueError, match="'input_ids' must hold integer ids: row 0, position 1 is None"):
        DataCollatorForCLM(roberta_tok)([{"input_ids": [0, None, 2]}])
    with pytest.raises(TypeError, match="'input_ids' of example 1 is None"):
        mlm([{"input_ids": [0, 5, 2]}, {"input_ids": None}])


def test_arrow_nulls_from_a_dataset_are_refused(roberta_tok):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"input_ids": [[0, 5, 2], [0, None, 2]]})
    for formatted in (dataset, dataset.with_format("numpy")):
        rows = [formatted[i] for i in range(2)]
        # Lists hold None (a missing id: ValueError), numpy rows NaN (a float column: TypeError).
        with pytest.raises((TypeError, ValueError), match="integer"):
            DataCollatorForMLM(roberta_tok, seed=0)(rows)
        with pytest.raises((TypeError, ValueError), match="integer"):
            DataCollatorForCLM(roberta_tok, padding_free=True)(rows)


def test_tensor_and_array_rows_collate_like_lists(roberta_tok, lines):
    """A dataset with a torch or numpy format hands the collator tensors instead of lists."""
    features = features_of(roberta_tok, lines[:6], max_length=30)
    expected = DataCollatorForMLM(roberta_tok, seed=2)(features)
    for convert in (torch.tensor, np.array, tuple):
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
    with pytest.raises(ValueError, match="labels of example 0 have 4 entries, its input_ids 2 tokens"):
        DataCollatorForCLM(pad_id=0, padding_free=True)([{"input_ids": [1, 2], "labels": [1, 2, 3, 9]}])


# --- issue 18 row 9: drop-in fidelity --------------------------------------------------------------------

OTHER_FEATURES = {
    "score": [0.5, 1.5, 2.0],  # Python floats: float32 tensors in transformers, float64 arrays for "np"
    "weights": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]],
    "label": [0, 1, 1],
    "numpy_score": [np.float64(0.5), np.float64(1.5), np.float64(2.0)],  # float64 in both
    "flag": [True, False, True],
}


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("mlm", [True, False])
def test_other_features_come_back_with_transformers_dtypes(roberta_tok, return_tensors, mlm):
    rows = [[0, 100, 200, 2], [0, 300, 2], [0, 400, 500, 600, 2]]
    features = [{"input_ids": row, **{name: values[i] for name, values in OTHER_FEATURES.items()}}
                for i, row in enumerate(rows)]
    hf = transformers.DataCollatorForLanguageModeling(roberta_tok, mlm=mlm, return_tensors=return_tensors)(
        [dict(f) for f in features])
    ours = DataCollatorForMLM(roberta_tok, mlm=mlm, seed=0, return_tensors=return_tensors)([dict(f) for f in features])
    for name in OTHER_FEATURES:
        assert ours[name].dtype == hf[name].dtype, name
        assert ours[name].tolist() == hf[name].tolist(), name
    if not mlm:
        clm = DataCollatorForCLM(roberta_tok, return_tensors=return_tensors)([dict(f) for f in features])
        assert all(clm[name].dtype == hf[name].dtype for name in OTHER_FEATURES)


def test_a_text_feature_is_refused_by_name(roberta_tok):
    features = [{"input_ids": [0, 100, 2], "text": "a line"}, {"input_ids": [0, 2], "text": "another"}]
    for collator in (DataCollatorForMLM(roberta_tok, seed=0), DataCollatorForCLM(roberta_tok)):
        with pytest.raises(TypeError, match=r"feature 'text' holds str values \(example 0: 'a line'\); a batch holds "
                                            r"numbers only: drop text columns"):
            collator([dict(f) for f in features])
    ragged = [{"input_ids": [0, 100, 2], "weights": [0.5]}, {"input_ids": [0, 2], "weights": [0.5, 1.0, 2.0]}]
    with pytest.raises(ValueError, match="feature 'weights' has rows of different lengths"):
        DataCollatorForCLM(roberta_tok)(ragged)


def test_byte_level_bpe_whole_words_are_words_for_gpt2_as_for_roberta(lines):
    """transformers finds words by offsets: RoBERTa's exclude the space before a word, GPT-2's include it
    (trim_offsets=False), so for GPT-2 every token continues the previous one and a row is one "word",
    masked whole or not at all. fastlm reads word starts from the Ġ mark both vocabularies share: the same
    words for GPT-2 as for RoBERTa (and as transformers finds for RoBERTa), a word's trailing punctuation
    included."""
    from tests.data import gpt2_tokenizer, roberta_tokenizer

    gpt2, roberta = gpt2_tokenizer(), roberta_tokenizer()
    gpt2.add_special_tokens({"mask_token": "<|mask|>", "pad_token": "<|endoftext|>"})
    text = [" ".join(line.split()[:30]) for line in lines[:24]]
    words = {}
    for name, tok in (("gpt2", gpt2), ("roberta", roberta)):
        enc = tok(text, padding="max_length", max_length=128, return_offsets_mapping=True,
                  return_special_tokens_mask=True)
        assert all(len(ids) == 128 for ids in enc["input_ids"]), "no row is cut: both tokenizers see the same text"
        hf_word_ids = [hf_words(enc, r) for r in range(len(text))]
        collator = DataCollatorForMLM(tok, whole_word_mask=True, mlm_probability=0.2, seed=0, return_tensors="np")
        assert collator.masker.whole_word == "bpe"
        tokens = [tok.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
        specials = [set(np.flatnonzero(mask)) for mask in enc["special_tokens_mask"]]
        # fastlm's words: a run starting at a token marked Ġ (or at the row's first real token).
        ours = [[i for i, t in enumerate(row) if i not in special and (t.startswith("\u0120") or i - 1 in special
                                                                       or i == 0)]
                for row, special in zip(tokens, specials)]
        words[name] = (ours, hf_word_ids, enc, collator)

    gpt2_starts, gpt2_hf, gpt2_enc, gpt2_collator = words["gpt2"]
    roberta_starts, roberta_hf, _, _ = words["roberta"]
    # transformers: one word per GPT-2 row; RoBERTa rows have as many words as fastlm finds.
    assert all(len(set(w[w >= 0].tolist())) == 1 for w in gpt2_hf)
    for starts, hf in zip(roberta_starts, roberta_hf):
        hf_starts = [i for i in range(len(hf)) if hf[i] >= 0 and (i == 0 or hf[i] != hf[i - 1])]
        assert starts == hf_starts
    # fastlm: GPT-2 rows (no <s>) have RoBERTa's words, one token earlier.
    assert gpt2_starts == [[i - 1 for i in row] for row in roberta_starts]

    # And the collator masks those words whole, several per row, never the whole row at once.
    features = [{"input_ids": ids, "attention_mask": mask}
                for ids, mask in zip(gpt2_enc["input_ids"], gpt2_enc["attention_mask"])]
    labels = gpt2_collator(features)["labels"]
    lengths = [sum(mask) for mask in gpt2_enc["attention_mask"]]
    for r, starts in enumerate(gpt2_starts):
        bounds = starts + [lengths[r]]
        for a, b in zip(bounds[:-1], bounds[1:]):
            picked = labels[r, a:b] != IGNORE_INDEX
            assert picked.all() or not picked.any(), "a word is masked whole or not at all"
    targets = labels != IGNORE_INDEX
    assert targets.any() and not any(targets[r, :n].all() for r, n in enumerate(lengths))
