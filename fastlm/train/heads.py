"""The training loss without the (tokens x vocab) logits: chunked fused linear + cross-entropy (CLM), sparse MLM head.

`LMLoss(model, task)` wraps a Hugging Face *ForCausalLM / *ForMaskedLM so that DeepSpeed's engine is built
around it: `engine(**inputs, labels=labels)` runs the base model and then
- CLM: the output projection and the cross-entropy together, a chunk of rows at a time; the forward pass
  also computes the gradients of the hidden states and of the head's weight (and bias), which the
  backward pass only scales (Liger's FusedLinearCrossEntropy, in plain PyTorch);
- MLM: the MLM head (transform + decoder) only at the positions that have a label (ModernBERT's
  sparse_prediction);
and returns what the runner's loss needs, as `row_nll` does from the dense logits: each row's sum of
token NLL (float64) and each row's number of target tokens. A model it cannot handle gets the dense
logits, and `summary` says why. The HF model stays `.model` (save_pretrained, generate).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.packing import IGNORE_INDEX as IGNORE

# Config fields with which a causal LM rescales or caps its logits after the projection (Gemma 2, Cohere,
# Granite): the fused loss would miss that step.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def row_nll(logits, labels, *, shift):
    """The dense loss: (each row's sum of token negative log-likelihoods in float64, each row's number of
    target tokens) from the logits.

    CLM predicts token t+1 from position t (shift=True), as HF's models do with `labels`; MLM scores
    each masked position in place. Logits are upcast to float32 like HF's loss. The labels shift, not
    the logits (HF's ForCausalLMLoss): slicing the logits would copy all batch x length x vocab of them.
    """
    if shift:
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(labels.shape).sum(1).double(), (labels != IGNORE).sum(1)


def default_chunk_rows(vocab_size):
    """Rows per chunk: at most 2**23 float32 logits (32 MiB) a chunk, in multiples of 64 rows (the reductions over
    a chunk's rows run at full vector width), at least 64 rows so the products stay efficient."""
    return max(64, 2**23 // vocab_size // 64 * 64)


def _fused_pass(hidden, weight, bias, targets, chunk_rows, *, grads, token_scale=None):
    """Per-token NLL (float32) of `hidden @ weight.T + bias` against `targets` (all real tokens), chunk by chunk,
    and, for each of (hidden, weight, bias) that `grads` asks for, the gradient of sum(token_scale x NLL)
    (token_scale: one per row; None for 1). Softmax and gradient math in float32 whatever the input dtype."""
    n = hidden.shape[0]
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads[0] else None
    # Summed over chunks in float32: a bf16 running sum would lose the small chunks' contributions.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads[2] else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        _chunk(hidden[rows], weight, bias, targets[None, rows], None if token_scale is None else token_scale[rows],
               nll=nll[rows], grad_hidden=None if grad_hidden is None else grad_hidden[rows], grad_weight=grad_weight,
               grad_bias=grad_bias)
    return nll, grad_hidden, grad_weight, grad_bias


def _chunk(h, weight, bias, t, scale, *, nll, grad_hidden, grad_weight, grad_bias):
    """One chunk of rows, into the given outputs. A function of its own so that its chunk-sized buffer is freed
    before the next chunk allocates one."""
    # One chunk-sized buffer, worked in place and held transposed (vocab x rows): BLAS computes
    # weight @ h.T up to twice as fast as h @ weight.T on a CPU. It holds the logits (as the dense head computes
    # them, autocast included), then exp(logits - max), then exp(logits - max) - onehot x total.
    logits = (torch.mm(weight, h.T) if bias is None else torch.addmm(bias[:, None], weight, h.T)).float()
    target_logit = logits.gather(0, t)
    top = logits.amax(dim=0, keepdim=True)
    exp = logits.sub_(top).exp_()
    total = exp.sum(dim=0, keepdim=True)
    nll.copy_((total.log() + (top - target_logit)).squeeze(0))
    if grad_hidden is None and grad_weight is None and grad_bias is None:
        return
    with torch.autocast(h.device.type, enabled=False):
        # The logits' gradient is (exp - onehot x total) / total x scale: subtracting the target's total in place
        # keeps the exact cancellation at the target, and the per-row factor goes on the small (rows x width)
        # products instead of a pass over the chunk.
        exp.scatter_add_(0, t, -total)
        row_factor = total.reciprocal_().squeeze(0)
        if scale is not None:
            row_factor.mul_(scale)
        if grad_hidden is not None:
            torch.mm(exp.T.to(weight.dtype), weight, out=grad_hidden)
            grad_hidden.mul_(row_factor[:, None].to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.addmm_(exp, h.float() * row_factor[:, None])
        if grad_bias is not None:
            grad_bias.addmv_(exp, row_factor)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Per-token NLL of a linear head; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        grads = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        nll, grad_hidden, grad_weight, grad_bias = _fused_pass(hidden, weight, bias, targets, chunk_rows, grads=grads)
        ctx.save_for_backward(hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias)
        ctx.chunk_rows, ctx.grads, ctx.used = chunk_rows, grads, False
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_nll[:1].float() if grad_nll.numel() else grad_nll.new_zeros(1, dtype=torch.float32)
        # The runner's loss weighs every token alike (sum x a constant): the stored gradients, scaled in place,
        # are exact. Any other weighting, or a second backward (retain_graph), computes them again.
        if ctx.used or (grad_nll.numel() and not torch.equal(grad_nll, grad_nll[:1].expand_as(grad_nll))):
            _, grad_hidden, grad_weight, grad_bias = _fused_pass(hidden, weight, bias, targets, ctx.chunk_rows,
                                                                 grads=ctx.grads, token_scale=grad_nll.float())
            scale = None
        ctx.used = True
        return (_scaled(grad_hidden, scale, hidden), _scaled(grad_weight, scale, weight), _scaled(grad_bias, scale, bias),
                None, None)


def _scaled(grad, scale, like):
    """grad x scale (in place: grad is float32 or like's dtype, and used once), in the dtype of `like`."""
    if grad is None:
        return None
    if scale is not None:
        grad = grad.mul_(scale) if grad.dtype == torch.float32 else (grad.float() * scale)
    return grad.to(like.dtype)


def fused_linear_cross_entropy(hidden, weight, bias, targets, *, chunk_rows=None):
    """Per-token NLL (float32) of the linear head (weight, bias) over hidden rows (n, H) against targets (n,),
    all real tokens (no -100), without ever holding more than `chunk_rows` rows of logits."""
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return _fused_pass(hidden, weight, bias, targets, chunk_rows, grads=(False, False, False))[0]
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)


def _mlm_head(model):
    """(base model, head module, None) of a *ForMaskedLM whose head is one module holding the output embeddings,
    else (None, None, the reason)."""
    base = model.base_model
    if base is model:
        return None, None, f"{type(model).__name__} has no separate base model"
    others = [child for child in model.children() if child is not base and any(True for _ in child.parameters())]
    if len(others) != 1:
        return None, None, f"{type(model).__name__}'s head is not one module ({len(others)} modules beside the base model)"
    head, decoder = others[0], model.get_output_embeddings()
    if decoder is None or not any(m is decoder for m in head.modules()):
        return None, None, f"{type(model).__name__}'s output embeddings are not in its head"
    return base, head, None


def _clm_head(model):
    """(base model, output projection, None) of a causal LM whose logits are a plain linear map of the base
    model's last hidden states, else (None, None, the reason)."""
    base, head = model.base_model, model.get_output_embeddings()
    if base is model:
        return None, None, f"{type(model).__name__} has no separate base model"
    if not isinstance(head, nn.Linear):
        return None, None, f"{type(model).__name__}'s output embeddings are not an nn.Linear"
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(model.config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return None, None, f"{type(model).__name__} transforms its logits ({', '.join(transforms)})"
    return base, head, None


class LMLoss(nn.Module):
    """A HF language model and its training loss: forward(labels=..., **model inputs) -> (each row's NLL sum in
    float64, each row's number of target tokens), the loss and gradients of the dense logits (CLM: the labels
    shift by one; -100 is no target)."""

    def __init__(self, model, task, *, chunk_rows=None, zero_stage=0):
        super().__init__()
        if task not in ("clm", "mlm"):
            raise ValueError(f"task must be 'clm' or 'mlm', not {task!r}")
        self.model, self.task = model, task
        base, head, self.dense_reason = (_clm_head if task == "clm" else _mlm_head)(model)
        self.chunk_rows = chunk_rows or default_chunk_rows(model.config.vocab_size)
        # A tuple, not attributes: nn.Module would register them again, beside .model, in the state dict.
        self._parts = (base, head)
        if task == "clm" and base is not None and zero_stage == 3:
            # ZeRO-3 gathers a partitioned weight inside its own module's forward; the fused loss reads the
            # head's weight outside it, so this module's forward (and backward) gathers it too. (DeepSpeed 0.19
            # also gathers a parameter read during any module's forward; older versions need this.)
            import deepspeed

            for parameter in head.parameters():
                deepspeed.zero.register_external_parameter(self, parameter)

    @property
    def config(self):
        return self.model.config

    @property
    def sparse_head(self):
        """The MLM head when it runs only at the labelled positions, else None."""
        return self._parts[1] if self.task == "mlm" and self.dense_reason is None else None

    # Checkpoints hold the HF model's own names (no "model." prefix), so one saved before the loss wrapped the
    # model, or from the model alone, loads as it is.
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def summary(self):
        """One line: how the loss is computed, and why the dense logits where they are used."""
        if self.dense_reason:
            return f"{self.task} loss: dense logits ({self.dense_reason})"
        if self.task == "clm":
            return f"clm loss: fused linear + cross-entropy, {self.chunk_rows} rows of logits at a time"
        return "mlm loss: sparse prediction (the MLM head runs only where a label is)"

    def forward(self, labels, **inputs):
        shift = self.task == "clm"
        base, head = self._parts
        if base is None:
            return row_nll(self.model(**inputs).logits, labels, shift=shift)
        if shift:  # the labels shift, not the hidden states (HF's ForCausalLMLoss)
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        hidden = base(**inputs)[0]
        flat_labels = labels.reshape(-1)
        rows = flat_labels.ne(IGNORE).nonzero().squeeze(1)
        selected, targets = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), flat_labels.index_select(0, rows)
        if shift:
            nll = fused_linear_cross_entropy(selected, head.weight, head.bias, targets, chunk_rows=self.chunk_rows)
        else:  # the head as one batch row, for heads that expect (batch, length, width)
            logits = head(selected.unsqueeze(0)).squeeze(0)
            nll = F.cross_entropy(logits.float(), targets, reduction="none")
        token_nll = nll.new_zeros(labels.numel()).index_add(0, rows, nll)
        return token_nll.view(labels.shape).sum(1).double(), labels.ne(IGNORE).sum(1)
