"""--optim muon: Muon for the matrices inside the transformer blocks, AdamW for everything else.

The optimizer is DeepSpeed's MuonWithAuxAdam at every ZeRO stage: ZeRO 1-3 flatten and partition the
parameters, and DeepSpeed's ZeRO optimizers gather each Muon matrix whole before orthogonalising it, which a
torch optimizer handed flat partitions cannot do; without ZeRO the same class orthogonalises each matrix
itself, so every stage computes the same update (docs/muon.md says why it was chosen over torch.optim.Muon).
DeepSpeed's own parameter rule (2-D and no "embed"/"lm_head" in the name) would put GPT-2's `wte` and
`wpe` under Muon, so the runner builds the optimizer and its groups itself.

--learning_rate means what it means for AdamW: each matrix's Muon step is scaled to AdamW's update size
(Moonshot's rule, torch.optim.Muon's adjust_lr_fn="match_rms_adamw": lr x 0.2 x sqrt(max(rows, cols))),
with the weight decay applied at the unscaled rate, as torch's Muon applies it.
"""
import math

import torch

from fastlm.train.errors import ConfigError

RULE = ("Muon: the 2-D weights inside the transformer blocks; AdamW: token/position embeddings, the LM head "
        "(tied or not), norms and biases")


def _shape(p):
    return tuple(getattr(p, "ds_shape", p.shape))  # under ZeRO-3 p.shape is the empty local partition


def muon_parameters(model):
    """The parameters Muon trains: the 2-D weights of the model's repeated blocks (the modules of its
    nn.ModuleLists: GPT-2's transformer.h, BERT/RoBERTa's encoder.layer), minus any weight that is also an
    input or output embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        module = get()
        if module is not None:
            embeddings.add(id(module.weight))
    found = {}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for p in module.parameters():
                if p.requires_grad and len(_shape(p)) == 2 and id(p) not in embeddings:
                    found[id(p)] = p
    if not found:
        raise ConfigError(f"--optim muon: the {model.config.model_type} model has no transformer blocks "
                          "(nn.ModuleList) with 2-D weights for Muon; use --optim adamw_torch")
    return list(found.values())


def _match_adamw(shape):
    """DeepSpeed's Muon scales an orthogonalised update by sqrt(max(1, rows / cols)) (Keller Jordan's
    rule); this factor turns that into match_rms_adamw's 0.2 x sqrt(max(rows, cols))."""
    rows, cols = shape
    return 0.2 * math.sqrt(max(rows, cols)) / math.sqrt(max(1.0, rows / cols))


def param_groups(model, optim):
    """MuonWithAuxAdam's groups: one Muon group per matrix shape (its learning rate matched to AdamW's),
    AdamW's decayed matrices (embeddings, an untied head) and its undecayed vectors (biases, norms). Tags every
    parameter with `use_muon`, which DeepSpeed's ZeRO optimizers read. Returns (groups, a one-line summary)."""
    hidden = muon_parameters(model)
    hidden_ids = {id(p) for p in hidden}
    lr = optim.muon_lr or optim.learning_rate
    by_shape = {}
    for p in hidden:
        by_shape.setdefault(_shape(p), []).append(p)
    groups = []
    for shape, params in by_shape.items():
        scale = _match_adamw(shape)
        groups.append(dict(params=params, use_muon=True, lr=lr * scale, momentum=optim.muon_momentum,
                           weight_decay=optim.weight_decay / scale))
    adam = dict(use_muon=False, lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
                eps=optim.adam_epsilon)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    matrices = [p for p in rest if len(_shape(p)) >= 2]
    vectors = [p for p in rest if len(_shape(p)) < 2]
    groups += [dict(params=params, weight_decay=decay, **adam)
               for params, decay in ((matrices, optim.weight_decay), (vectors, 0.0)) if params]
    for p in model.parameters():
        p.use_muon = id(p) in hidden_ids
    count = lambda params: sum(math.prod(_shape(p)) for p in params)  # noqa: E731
    summary = (f"--optim muon: {RULE}. Muon trains {len(hidden)} matrices ({count(hidden):,} parameters), AdamW "
               f"{len(rest)} tensors ({count(rest):,} parameters)")
    return groups, summary


def optimizer(groups, *, device_type):
    """DeepSpeed's MuonWithAuxAdam with torch's fused AdamW for the AdamW groups (DeepSpeed's FusedAdam would
    JIT-compile an op first). DeepSpeed wraps its Newton-Schulz iteration in torch.compile, which on CPU
    means inductor compiling C++ at the first step; the runner compiles nothing on CPU, so torch.compile
    runs eagerly there (a process-wide stance: the runner itself never calls torch.compile)."""
    # Imported here, as DeepSpeed's ZeRO optimizers import it: the module pulls in torch's inductor, about 2 s
    # of every runner process's start that only --optim muon (or DeepSpeed's ZeRO/bf16 optimizers) uses.
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    if device_type == "cpu":
        torch.compiler.set_stance("force_eager")
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs=dict(fused=True))
