"""Evaluation: token-weighted loss and perplexity over all ranks.

Perplexity is exp(sum of token NLL / number of target tokens), both summed over ranks and batches (not
a mean of batch means, which is biased for MLM and ragged last batches).
"""
import math

from fastlm.data import eval_batches
from fastlm.model import model_inputs, position_offset


def perplexity(nll_sum, n_targets):
    """exp(mean token NLL); inf when it overflows a float."""
    if n_targets <= 0:
        raise ValueError("perplexity over zero target tokens is undefined")
    try:
        return math.exp(nll_sum / n_targets)
    except OverflowError:
        return math.inf


def token_nll(logits, labels, *, shift):
    """(sum of token negative log-likelihoods in float64, number of target tokens) of one batch.

    CLM predicts token t+1 from position t (shift=True), as HF's models do with `labels`; MLM scores
    each masked position in place. Logits are upcast to float32 like HF's loss. The labels shift, not
    the logits (HF's ForCausalLMLoss): slicing the logits would copy all batch x length x vocab of them.
    """
    import torch.nn.functional as F

    if shift:
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll.double(), (labels != -100).sum()


def evaluate(engine, blocks, *, args, rank, world_size, masker=None):
    """Token-weighted evaluation over all ranks: {"eval_loss", "perplexity", "eval_tokens"}."""
    import torch
    import torch.distributed as dist


    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    config, dtype = engine.module.config, engine.module.dtype
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        for batch, counts in eval_batches(blocks, batch_size=args.per_device_eval_batch_size, rank=rank,
                                          world_size=world_size, masker=masker,
                                          position_offset=position_offset(engine.module.config)):
            batch = {k: torch.from_numpy(v).to(engine.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = engine(**model_inputs(batch, config, task=args.task, dtype=dtype)).logits
            if counts:
                nll, n = token_nll(logits, labels, shift=args.task == "clm")
                totals[0] += nll
                totals[1] += n
    if was_training:
        engine.train()
    if world_size > 1:
        dist.all_reduce(totals)
    nll_sum, n_targets = totals.tolist()
    if not n_targets:  # e.g. one-token documents packed whole: report it, don't fail after the training
        return {"eval_loss": math.nan, "perplexity": math.nan, "eval_tokens": 0}
    return {"eval_loss": nll_sum / n_targets, "perplexity": perplexity(nll_sum, n_targets),
            "eval_tokens": int(n_targets)}
