"""Weighted data mixtures: the flags, the blended sample order (fastlm.train.sampling.Mixture) and a mixture run."""
import numpy as np
import pytest

from fastlm import pack_blocks, run
from fastlm.blending import blending_index
from fastlm.train import sources
from fastlm.train.sampling import Mixture, TrainBatches, TrainSource, epoch_order
from tests.data import wikitext_lines
from tests.test_run import TINY, _metrics, _resume_from


def source_blocks(source, n_blocks, block_size=4):
    """n_blocks blocks whose first token says (source, block): 1000 * source + block."""
    tokens = np.zeros(n_blocks * block_size, dtype=np.int64)
    tokens[::block_size] = 1000 * source + np.arange(n_blocks)
    return pack_blocks(tokens, np.array([0, len(tokens)]), block_size)


def mixture(sizes, weights):
    return Mixture([TrainSource(f"s{i}", source_blocks(i, n), w) for i, (n, w) in enumerate(zip(sizes, weights))])


def drawn(batch):
    """(source, block) of each row of a gathered batch."""
    return [divmod(int(first), 1000) for first in batch["input_ids"][:, 0]]


# --- the flags ----------------------------------------------------------------------------------------

def test_weighted_sources_parse_names_paths_and_weights(tmp_path):
    colon = tmp_path / "odd:1"
    colon.mkdir()
    assert sources.train_sources(["web:0.7", "books=/data/b.txt:0.3"]) == [
        sources.Source("web", "web", 0.7), sources.Source("books", "/data/b.txt", 0.3)]
    assert sources.train_sources(["runs/a.jsonl", "b"]) == [sources.Source("a", "runs/a.jsonl"), sources.Source("b", "b")]
    assert sources.train_sources([str(colon)]) == [sources.Source("odd_1", str(colon))]  # it exists: a path
    assert sources.eval_sources(["wiki=w/valid.txt", "w/test.txt.xz"]) == [
        sources.Source("wiki", "w/valid.txt"), sources.Source("test", "w/test.txt.xz")]


@pytest.mark.parametrize("values, message", [
    (["a:0.7", "b"], "give a weight to every source or to none"),
    (["a:0", "b:1"], "the weight must be a finite number > 0, got 0"),
    (["a:-1", "b:1"], "the weight must be a finite number > 0"),
    (["a:nan", "b:1"], "the weight must be a finite number > 0"),
    (["x/a:1", "y/a:2"], "two sources are named 'a'"),
    (["a=", "b"], "no path after a="),
    (["a", "b", "--max_train_samples", "100"], "--max_train_samples takes the first blocks of one training source"),
])
def test_bad_mixtures_are_refused_before_anything_starts(values, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", *values, "--config_name", "gpt2-tiny"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --- the sample order ---------------------------------------------------------------------------------

def test_one_source_keeps_the_single_corpus_order():
    """A run of one store shuffles exactly as before mixtures existed, so its checkpoints still resume."""
    blocks = source_blocks(0, 50)
    batches = TrainBatches(blocks, micro_batch=5, accumulation=1, rank=0, world_size=1, epoch=3, seed=7)
    order = np.random.Generator(np.random.PCG64([3, 7])).permutation(50)
    assert np.concatenate([batches.indices(j) for j in range(len(batches))]).tolist() == order.tolist()
    assert "source" not in batches[0]


def test_positions_follow_the_blend_and_each_source_its_own_shuffle():
    sizes, weights = [50, 20, 7], [0.5, 0.3, 0.2]
    mix = mixture(sizes, weights)
    assert len(mix) == 77
    epochs = 3
    blend_source, blend_sample, _ = blending_index(weights, epochs * 77)
    rows = []
    for epoch in range(epochs):
        source, block, sample = mix.locate(epoch, np.arange(77), seed=5)
        rows += list(zip(source.tolist(), block.tolist(), sample.tolist()))
    assert [r[0] for r in rows] == blend_source.tolist() and [r[2] for r in rows] == blend_sample.tolist()
    for s, n in enumerate(sizes):
        blocks = [b for source, b, _ in rows if source == s]
        for e in range(len(blocks) // n):  # every full epoch of the source is its own permutation
            assert blocks[e * n:(e + 1) * n] == epoch_order(n, seed=5, epoch=e, source=s).tolist()
        assert blocks[n:2 * n] != blocks[:n]
    # Sources of equal size still shuffle apart.
    assert epoch_order(20, seed=5, epoch=0, source=1).tolist() != epoch_order(20, seed=5, epoch=0, source=2).tolist()


def test_the_blend_computed_in_chunks_or_from_any_position_is_the_same(monkeypatch):
    monkeypatch.setattr(Mixture, "CHUNK", 6)
    weights = [0.2, 0.5, 0.3]
    source, sample, _ = blending_index(weights, 5 * 40)
    walked = mixture([11, 19, 10], weights)
    for epoch in range(5):
        got, _, k = walked.locate(epoch, np.arange(40), seed=1)
        assert got.tolist() == source[epoch * 40:(epoch + 1) * 40].tolist()
        assert k.tolist() == sample[epoch * 40:(epoch + 1) * 40].tolist()
    resumed = mixture([11, 19, 10], weights)  # a resumed run starts late, with nothing cached
    positions = np.arange(13, 29)
    assert resumed.locate(3, positions, seed=1)[1].tolist() == walked.locate(3, positions, seed=1)[1].tolist()


def test_a_step_takes_the_same_samples_whatever_its_split():
    """Global batch 16 as micro x accumulation x ranks 16x1x1, 8x2x1, 4x2x2, 1x4x4, from the start and
    resumed mid-epoch: the same (source, block) rows per step, and each row's "source" is its own."""
    mix = mixture([40, 30, 9], [0.6, 0.3, 0.1])

    def steps(micro, accum, world, start=0):
        shares = [TrainBatches(mix, micro_batch=micro, accumulation=accum, rank=r, world_size=world, epoch=1,
                               seed=2, start=start) for r in range(world)]
        by_step = []
        for k in range(len(shares[0]) // accum):
            rows = []
            for share in shares:
                for j in range(k * accum, (k + 1) * accum):
                    batch = share[j]
                    rows += drawn(batch)
                    assert batch["source"].tolist() == [s for s, _ in drawn(batch)]
            by_step.append(sorted(rows))
        return by_step

    reference = steps(16, 1, 1)
    assert len(reference) == 79 // 16
    for layout in [(8, 2, 1), (4, 2, 2), (1, 4, 4)]:
        assert steps(*layout) == reference, layout
    assert steps(4, 2, 2, start=32) == reference[2:]


def test_a_source_that_runs_out_starts_its_next_epoch_and_says_so():
    mix = mixture([40, 5], [0.7, 0.3])
    batches = TrainBatches(mix, micro_batch=4, accumulation=1, rank=0, world_size=1, epoch=0, seed=0)
    source, sample, _ = blending_index([0.7, 0.3], 44)
    expected = {j: [] for j in range(len(batches))}
    for position in range(44):  # a source's sample n, 2n, ... is the first of its next epoch
        s, k = int(source[position]), int(sample[position])
        if k and k % mix.sizes[s] == 0:
            expected[position // 4].append((f"s{s}", k // int(mix.sizes[s])))
    assert sum(expected.values(), []) == [("s1", 1), ("s1", 2)]  # the small source, twice; the big one never
    assert {j: batches.new_source_epochs(j) for j in range(len(batches))} == expected


def test_unweighted_sources_blend_in_proportion_to_their_blocks():
    mix = Mixture([TrainSource("a", source_blocks(0, 30)), TrainSource("b", source_blocks(1, 10))])
    assert mix.weights.tolist() == [0.75, 0.25]
    source, _, _ = mix.locate(0, np.arange(40), seed=0)
    assert np.bincount(source).tolist() == [30, 10]


# --- a mixture run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture_stores(tmp_path_factory):
    """Two stores with one tokenizer: "big" (~300 blocks of 64) and "small" (a handful of blocks)."""
    from fastlm.prepare import prepare

    lines = [line for line in wikitext_lines("valid") if line.strip()]
    root = tmp_path_factory.mktemp("mixture")
    (root / "big.txt").write_text("".join(lines[:300]), encoding="utf-8")
    (root / "small.txt").write_text("".join(lines[300:306]), encoding="utf-8")
    big = prepare([str(root / "big.txt")], root / "big", train_tokenizer=True, vocab_size=512, progress=False)
    prepare([str(root / "small.txt")], root / "small", tokenizer=str(big.tokenizer_dir), progress=False)
    return root


def _mixture_argv(root, out, *extra, weights=("0.6", "0.4"), micro=8, accum=1):
    from transformers import GPT2Config

    if not (root / "config").is_dir():
        GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0).save_pretrained(root / "config")
    return ["--task", "clm", "--train_store", f"{root / 'big'}:{weights[0]}", f"{root / 'small'}:{weights[1]}",
            "--validation_split_percentage", "0", "--config_name", str(root / "config"), "--block_size", "64",
            "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accum),
            "--learning_rate", "3e-3", "--max_steps", "8", "--save_steps", "4", "--output_dir", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def mixture_run(mixture_stores, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("mixture_run")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        results = run.train(_mixture_argv(mixture_stores, out))
    return out, results, log.getvalue()


def test_a_mixture_run_logs_each_source_and_reports_its_blocks(mixture_run):
    out, results, log = mixture_run
    sources = results["train_sources"]
    small = sources["small"]["blocks"]
    assert 4 <= small < 0.4 * 64  # so the small source runs out within the run
    blend, _, counts = blending_index([0.6, 0.4], 8 * 8)
    assert [sources[name]["blocks_trained"] for name in ("big", "small")] == counts.tolist()
    assert [sources[name]["tokens_trained"] for name in ("big", "small")] == [64 * c for c in counts.tolist()]
    assert sources["big"]["weight"] == pytest.approx(0.6)
    records = [m for m in _metrics(out) if "loss" in m]
    assert len(records) == 8
    for record, step in zip(records, range(8)):
        assert record["train_big_tokens"] + record["train_small_tokens"] == 8 * 64
        assert record["train_small_tokens"] == 64 * int((blend[step * 8:(step + 1) * 8] == 1).sum())
        # One micro batch a step, every row 63 targets: the step's loss is its sources' losses weighted by rows.
        rows = {name: record[f"train_{name}_tokens"] // 64 for name in ("big", "small")}
        mixed = sum(rows[name] * record[f"train_{name}_loss"] for name in rows) / 8
        assert record["loss"] == pytest.approx(mixed, rel=1e-5)
    assert "training source small ran out of blocks and starts its epoch 1" in log


def test_a_mixture_resumes_on_another_split_with_the_same_losses(mixture_run, mixture_stores, tmp_path):
    full, _, _ = mixture_run
    _resume_from(full, 4, tmp_path)
    results = run.train(_mixture_argv(mixture_stores, tmp_path, "--resume", micro=4, accum=2))
    before = {m["step"]: m for m in _metrics(full) if "loss" in m}
    after = {m["step"]: m for m in _metrics(tmp_path) if "loss" in m}
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        for key in ("loss", "train_big_loss", "train_small_loss"):
            assert after[step][key] == pytest.approx(before[step][key], rel=2e-5, abs=0), (step, key)
        assert after[step]["train_small_tokens"] == before[step]["train_small_tokens"]
    blocks = {name: s["blocks_trained"] for name, s in results["train_sources"].items()}
    assert blocks == {name: s["blocks_trained"] for name, s in mixture_run[1]["train_sources"].items()}


def test_resuming_with_other_weights_is_refused_naming_the_mixtures(mixture_run, mixture_stores, tmp_path, capsys):
    full, _, _ = mixture_run
    _resume_from(full, 4, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run.main(_mixture_argv(mixture_stores, tmp_path, "--resume", weights=("0.5", "0.5")))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "the checkpoint was trained on the mixture big:0.6" in err and "now big:0.5" in err
    assert "Traceback" not in err
