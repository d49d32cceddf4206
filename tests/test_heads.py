"""fastlm.train.heads: the fused CLM loss and the sparse MLM head give the dense loss and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from fastlm.train.model import flops_per_token, model_inputs, position_offset
from fastlm.train.heads import LMLoss, fused_linear_cross_entropy, row_nll

VOCAB, BATCH, LENGTH = 1000, 3, 24
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return GPT2LMHeadModel(config)


def bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1, **NO_DROPOUT))


def roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                            pad_token_id=1, type_vocab_size=1, **NO_DROPOUT))


MODELS = {"gpt2": (gpt2, "clm"), "bert": (bert, "mlm"), "roberta": (roberta, "mlm")}


def make_batch(model, task, *, packed, seed=0):
    """(model inputs as the runner passes them, labels): packed rows hold documents of 5-11 tokens, position
    ids restarting at each, CLM labels -100 at each document start, MLM labels at ~30% of the positions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (BATCH, LENGTH), generator=g)
    offset = position_offset(model.config)
    position_ids = torch.arange(LENGTH).repeat(BATCH, 1)
    starts = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    starts[:, 0] = True
    if packed:
        for row in range(BATCH):
            start = 0
            while start < LENGTH:
                starts[row, start] = True
                end = min(LENGTH, start + int(torch.randint(5, 12, (1,), generator=g)))
                position_ids[row, start:end] = torch.arange(end - start)
                start = end
    if task == "clm":
        labels = input_ids.masked_fill(starts, -100)
    else:
        labels = input_ids.masked_fill(torch.rand(BATCH, LENGTH, generator=g) > 0.3, -100)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if packed:
        batch["position_ids"] = position_ids + offset
    return model_inputs(batch, model.config, task=task, dtype=model.dtype), labels


def dense_loss(model, inputs, labels, task):
    """The reference: the HF model's logits and F.cross_entropy with sum reduction (CLM labels shifted)."""
    logits = model(**inputs).logits
    if task == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, fused, dense, *, atol, rtol):
    assert fused.keys() == dense.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in dense:
        torch.testing.assert_close(fused[name].float(), dense[name].float(), atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_rows", [5, 1024])  # 5 does not divide the target rows; 1024 holds them all
def test_loss_and_every_gradient_equal_the_dense_computation(name, packed, chunk_rows):
    build, task = MODELS[name]
    torch.manual_seed(0)
    model = build()
    loss = LMLoss(model, task, chunk_rows=chunk_rows)
    assert loss.dense_reason is None, loss.summary
    inputs, labels = make_batch(model, task, packed=packed)

    rows_nll, rows_targets = loss(labels=labels, **inputs)
    dense_rows, dense_targets = row_nll(model(**inputs).logits, labels, shift=task == "clm")
    assert rows_nll.dtype == torch.float64 and rows_nll.shape == (BATCH,)
    assert torch.equal(rows_targets, dense_targets)
    torch.testing.assert_close(rows_nll, dense_rows, atol=1e-5, rtol=1e-6)

    scale = 0.37  # the loop scales the summed NLL (accumulation x ranks / targets)
    fused = grads_of(model, loss(labels=labels, **inputs)[0].sum() * scale)
    dense = grads_of(model, dense_loss(model, inputs, labels, task) * scale)
    if task == "clm":  # tied: one tensor, its gradient from the input embedding and the output projection
        assert model.lm_head.weight is model.transformer.wte.weight
    assert_same_grads(model, fused, dense, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_all_labels_ignored_give_zero_loss_and_the_dense_zero_gradients(name):
    build, task = MODELS[name]
    torch.manual_seed(0)
    model = build()
    inputs, labels = make_batch(model, task, packed=False)
    labels.fill_(-100)
    rows_nll, rows_targets = LMLoss(model, task)(labels=labels, **inputs)
    assert rows_nll.tolist() == [0.0] * BATCH and rows_targets.tolist() == [0] * BATCH
    fused = grads_of(model, rows_nll.sum())
    assert all(not g.any() for g in fused.values())


@pytest.mark.parametrize("name", MODELS)
def test_bf16_model(name):
    build, task = MODELS[name]
    torch.manual_seed(0)
    model = build().to(torch.bfloat16)
    loss = LMLoss(model, task, chunk_rows=7)
    inputs, labels = make_batch(model, task, packed=True)
    rows_nll, _ = loss(labels=labels, **inputs)
    dense_rows, _ = row_nll(model(**inputs).logits, labels, shift=task == "clm")
    torch.testing.assert_close(rows_nll, dense_rows, atol=0.05, rtol=2e-3)
    fused = grads_of(model, loss(labels=labels, **inputs)[0].sum() * 0.01)
    dense = grads_of(model, dense_loss(model, inputs, labels, task) * 0.01)
    assert all(g.dtype == torch.bfloat16 for g in fused.values())
    # bf16 keeps 8 bits: the dense path rounds its logits' gradient to bf16, the fused one sums in float32
    assert_same_grads(model, fused, dense, atol=2e-3, rtol=0.1)


def test_bf16_autocast_over_a_float32_model():
    torch.manual_seed(0)
    model = gpt2()
    loss = LMLoss(model, "clm", chunk_rows=7)
    inputs, labels = make_batch(model, "clm", packed=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows_nll, _ = loss(labels=labels, **inputs)
        dense_rows, _ = row_nll(model(**inputs).logits, labels, shift=True)
    torch.testing.assert_close(rows_nll, dense_rows, atol=0.05, rtol=2e-3)


def test_rows_weighted_differently_still_give_the_dense_gradients():
    """A loss that weighs tokens unequally cannot reuse the forward's gradients: they are computed again."""
    torch.manual_seed(0)
    model = gpt2()
    loss = LMLoss(model, "clm", chunk_rows=5)
    inputs, labels = make_batch(model, "clm", packed=True)
    weights = torch.tensor([1.0, 0.25, 3.0], dtype=torch.float64)
    fused = grads_of(model, (loss(labels=labels, **inputs)[0] * weights).sum())
    dense = grads_of(model, (row_nll(model(**inputs).logits, labels, shift=True)[0] * weights).sum())
    assert_same_grads(model, fused, dense, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_with_a_bias(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(300, 16, dtype=dtype, requires_grad=True)
    bias = torch.randn(300, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    fused = fused_linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8)
    fused_grads = torch.autograd.grad(fused.sum() * 0.5, (hidden, weight, bias))
    dense = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")
    dense_grads = torch.autograd.grad(dense.sum() * 0.5, (hidden, weight, bias))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(fused, dense, **tolerance)
    for got, want in zip(fused_grads, dense_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tolerance)


def test_evaluation_without_gradients_gives_the_same_rows():
    torch.manual_seed(0)
    model = gpt2()
    loss = LMLoss(model, "clm", chunk_rows=5)
    inputs, labels = make_batch(model, "clm", packed=True)
    with torch.no_grad():
        evaluated = loss(labels=labels, **inputs)
    assert evaluated[0].grad_fn is None
    trained = loss(labels=labels, **inputs)
    assert torch.equal(evaluated[0], trained[0].detach()) and torch.equal(evaluated[1], trained[1])


def test_a_head_it_cannot_find_falls_back_to_the_dense_logits_and_says_why():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                                   dropout=0.0, attention_dropout=0.0))
    loss = LMLoss(model, "mlm")
    assert "DistilBertForMaskedLM's head is not one module" in loss.summary
    inputs, labels = make_batch(model, "mlm", packed=False)
    torch.testing.assert_close(loss(labels=labels, **inputs)[0], row_nll(model(**inputs).logits, labels, shift=False)[0])


def test_a_causal_lm_that_rescales_its_logits_falls_back():
    model = gpt2()
    model.config.logit_scale = 0.5
    assert LMLoss(model, "clm").summary == "clm loss: dense logits (GPT2LMHeadModel transforms its logits (logit_scale))"


def test_the_wrapper_exposes_the_hf_model_to_save(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    loss = LMLoss(gpt2(), "clm")
    assert loss.config is loss.model.config and loss.dtype == torch.float32
    assert loss.state_dict().keys() == loss.model.state_dict().keys()  # checkpoints keep the model's own names
    loss.model.save_pretrained(tmp_path)
    inputs, labels = make_batch(loss.model, "clm", packed=False)
    reloaded = LMLoss(AutoModelForCausalLM.from_pretrained(tmp_path), "clm")
    torch.testing.assert_close(reloaded(labels=labels, **inputs)[0], loss(labels=labels, **inputs)[0])


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_the_flops_of_a_sparse_mlm_step_count_the_head_at_the_labelled_positions(name):
    """The FLOP count behind MFU and train_flops: what the sparse head saves against the dense logits (15% of
    the positions labelled), as torch's FLOP counter measures a forward and backward of each, is what
    flops_per_token given the head takes off the dense count."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, length = MODELS[name][0](), 48
    loss = LMLoss(model, "mlm")
    input_ids = torch.randint(5, VOCAB, (8, length))
    labels = torch.full_like(input_ids, -100)
    labelled = torch.randperm(labels.numel())[: labels.numel() * 15 // 100]
    labels.view(-1)[labelled] = input_ids.view(-1)[labelled]
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)

    def flops_per_token_measured(step):
        with FlopCounterMode(display=False) as counter:
            step().backward()
        return counter.get_total_flops() / input_ids.numel()

    saved = flops_per_token_measured(lambda: model(**inputs).loss) - flops_per_token_measured(lambda: loss(**inputs)[0].sum())
    counted = flops_per_token(model, length) - flops_per_token(model, length, sparse_head=loss.sparse_head,
                                                                predicted=len(labelled) / labels.numel())
    # 6N also counts the head's biases and norm as if they were matmul weights: a few per cent.
    assert saved > 0 and counted == pytest.approx(saved, rel=0.05)


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be 'clm' or 'mlm'"):
        LMLoss(gpt2(), "seq2seq")


def adamw(model):
    # A large epsilon: Adam's update of a gradient near 0 would amplify float noise
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_a_deepspeed_engine_around_the_wrapper_trains_as_the_dense_model(one_rank_deepspeed, name, stage):
    """engine(labels=..., **inputs) -> backward -> step: the loss after two AdamW steps is the dense model's."""
    build, task = MODELS[name]
    torch.manual_seed(0)
    reference = build()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    inputs, labels = make_batch(reference, task, packed=True)
    optimizer = adamw(reference)
    for _ in range(2):
        optimizer.zero_grad()
        (dense_loss(reference, inputs, labels, task) * 0.1).backward()
        optimizer.step()
    with torch.no_grad():
        want = row_nll(reference(**inputs).logits, labels, shift=task == "clm")[0]

    model = build()
    model.load_state_dict(state)
    wrapper = LMLoss(model, task, chunk_rows=5, zero_stage=stage)
    # Every parameter partitioned (none kept whole for being small); no clipping (DeepSpeed's default clips)
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, *_ = one_rank_deepspeed.initialize(model=wrapper, optimizer=adamw(wrapper), config=config)
    for _ in range(2):
        rows_nll, _ = engine(labels=labels, **inputs)
        engine.backward(rows_nll.sum() * 0.1)
        engine.step()
    engine.eval()
    with torch.no_grad():
        got = engine(labels=labels, **inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
