"""Evaluation: token-weighted loss, perplexity and bits per byte over all ranks, for every evaluation set.

Perplexity is exp(sum of token NLL / number of target tokens), both summed over ranks and batches (not
a mean of batch means, which is biased for MLM and ragged last batches). Bits per byte divides the same
NLL, in bits, by the UTF-8 bytes of the text the scored tokens cover: a measure that does not depend on
the tokenizer.
"""
import math

import torch
from tqdm.auto import tqdm

from fastlm.train import dist
from fastlm.train.model import model_inputs, position_offset
from fastlm.train.sampling import eval_batches


def perplexity(nll_sum, n_targets):
    """exp(mean token NLL); inf when it overflows a float."""
    if n_targets <= 0:
        raise ValueError("perplexity over zero target tokens is undefined")
    try:
        return math.exp(nll_sum / n_targets)
    except OverflowError:
        return math.inf


def bits_per_byte(nll_sum, n_targets, *, n_tokens, n_bytes):
    """(sum of token NLL / ln 2) / (UTF-8 bytes of the text the scored tokens cover).

    The set's documents hold n_tokens tokens and n_bytes bytes; the n_targets scored tokens are taken to
    cover n_bytes * n_targets / n_tokens of them. Exact where every token is scored (strided evaluation,
    whole-document packing); otherwise (blocks that drop a remainder, each block's unscored first token)
    it is the scored tokens' mean NLL per byte of text, the usual definition (loss x tokens per byte).
    """
    if n_targets <= 0 or n_tokens <= 0 or n_bytes <= 0:
        raise ValueError("bits per byte needs scored tokens and text with tokens and bytes")
    return nll_sum / math.log(2) / (n_bytes * n_targets / n_tokens)


def evaluate_sets(engine, eval_sets, *, task, batch_size, rank, world_size, masker=None, progress=False):
    """Every evaluation set in turn: eval_<name>_loss, eval_<name>_perplexity, eval_<name>_tokens and, where
    the set's store records its text's bytes, eval_<name>_bits_per_byte (Trainer's eval_<name>_ prefix for
    several sets); the first set's values also as eval_loss, perplexity, eval_tokens, eval_bits_per_byte.
    progress: a progress bar of each set's batches on rank 0, as training shows its steps."""
    results = {}
    for i, eval_set in enumerate(eval_sets):
        result = evaluate(engine, eval_set.blocks, task=task, batch_size=batch_size, rank=rank, world_size=world_size,
                          masker=masker, progress=f"eval {eval_set.name}" if progress and rank == 0 else None)
        if eval_set.n_bytes and result["eval_tokens"]:
            nll_sum = result["eval_loss"] * result["eval_tokens"]
            result["eval_bits_per_byte"] = bits_per_byte(nll_sum, result["eval_tokens"], n_tokens=eval_set.n_tokens,
                                                         n_bytes=eval_set.n_bytes)
        if i == 0:
            results.update(result)
        results.update({f"eval_{eval_set.name}_{key.removeprefix('eval_')}": value for key, value in result.items()})
    return results


def evaluate(engine, blocks, *, task, batch_size, rank, world_size, masker=None, progress=None):
    """Token-weighted evaluation over all ranks: {"eval_loss", "perplexity", "eval_tokens"}. progress: the
    description of a progress bar over this rank's batches (None: no bar)."""
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    config, dtype = engine.module.config, engine.module.dtype
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        batches = eval_batches(blocks, batch_size=batch_size, rank=rank, world_size=world_size, masker=masker,
                               position_offset=position_offset(engine.module.config))
        per_rank = -(-len(blocks) // world_size)
        for batch, counts in tqdm(batches, total=-(-per_rank // batch_size), desc=progress, disable=progress is None,
                                  leave=False, dynamic_ncols=True):
            batch = {k: torch.from_numpy(v).to(engine.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            rows_nll, rows_targets = engine(labels=labels, **model_inputs(batch, config, task=task, dtype=dtype))
            if counts:
                totals[0] += rows_nll.sum()
                totals[1] += rows_targets.sum()
    if was_training:
        engine.train()
    nll_sum, n_targets = dist.sum_in_place(totals).tolist()
    if not n_targets:  # e.g. one-token documents packed whole: report it, don't fail after the training
        return {"eval_loss": math.nan, "perplexity": math.nan, "eval_tokens": 0}
    return {"eval_loss": nll_sum / n_targets, "perplexity": perplexity(nll_sum, n_targets),
            "eval_tokens": int(n_targets)}
