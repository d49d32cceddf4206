"""The model a run trains: its config (a preset, a config, a checkpoint's), built, fed packed batches and saved.

The model section of the run's configuration (config.ModelConfig) says which; the data section's block size
shapes presets and position embeddings.
"""
import shutil

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.masking_utils import (create_bidirectional_mask, find_packed_sequence_indices,
                                        packed_sequence_mask_function)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from fastlm.tokenizer import vocab_size as tokenizer_vocab_size
from fastlm.train import outputs
from fastlm.train.errors import ConfigError, warn
from fastlm.train.safe_load import from_pretrained

# Model shapes to train from scratch with the store's tokenizer: (model_type, config overrides).
PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=64)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128)),
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768)),
    "roberta-tiny": ("roberta", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256)),
    "bert-tiny": ("bert", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256)),
}


def model_type_task(model):
    """--task auto: mlm when the model type has a masked-LM head in transformers (BERT, RoBERTa, ...), else clm,
    so a run_mlm.py command needs no --task. Reads the model's config.json when only a path names it."""
    if model.config_name in PRESETS:
        model_type = PRESETS[model.config_name][0]
    elif model.model_type:
        model_type = model.model_type
    else:
        model_type = load_config(model).model_type
    return "mlm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"


def load_config(model):
    """The transformers config the run's model is built from (presets aside), as run_clm.py finds it:
    --config_name, else --model_name_or_path's, else --model_type's defaults; then --config_overrides."""
    name = model.config_name or model.model_name_or_path
    try:
        if name:
            config = AutoConfig.from_pretrained(name, trust_remote_code=model.trust_remote_code,
                                                revision=model.model_revision)
        else:
            config = CONFIG_MAPPING[model.model_type]()
    except KeyError:
        raise ConfigError(f"--model_type {model.model_type} is not a transformers model type") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the model config {name!r}: {str(error).splitlines()[0]}") from None
    apply_config_overrides(config, model.config_overrides)
    return config


def apply_config_overrides(config, overrides):
    if not overrides:
        return
    try:
        config.update_from_string(overrides)
    except ValueError as error:
        raise ConfigError(f"--config_overrides {overrides!r}: {error}") from None


def model_config(model, tokenizer, *, block_size):
    """The config of a model trained from scratch: a preset shaped to the tokenizer, else what run_clm.py
    builds (--config_name, or --model_type's defaults), with --config_overrides applied either way."""
    if model.config_name not in PRESETS:
        return load_config(model)
    model_type, shape = PRESETS[model.config_name]
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if model_type == "gpt2":
        extra = dict(n_positions=max(block_size, 1024 if model.config_name == "gpt2-124m" else 0))
    else:  # RoBERTa's positions start after the padding index
        extra = dict(max_position_embeddings=block_size + 2, type_vocab_size=1 if model_type == "roberta" else 2)
    specials = {k: v for k, v in specials.items() if v is not None}
    config = CONFIG_MAPPING[model_type](vocab_size=tokenizer_vocab_size(tokenizer), **shape, **extra, **specials)
    apply_config_overrides(config, model.config_overrides)
    return config


def position_offset(config):
    """Where a model's position ids start: RoBERTa-style embeddings number positions after the padding
    index (HF's create_position_ids_from_input_ids), others from 0."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") and config.pad_token_id is not None:
        return config.pad_token_id + 1
    return 0


def max_positions(config):
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return n - position_offset(config) if n else n


def build_model(model, tokenizer, *, block_size, ds_config):
    """(the HF model, the object that must stay alive while it trains: ZeRO-3 builds the model partitioned
    (deepspeed.zero.Init) only while an HfDeepSpeedConfig is alive; without it from_config skips HF's weight
    init)."""
    auto = AutoModelForCausalLM if model.task == "clm" else AutoModelForMaskedLM
    # With --model_name_or_path, --config_name (if any) is the config its weights load into, as in run_clm.py.
    config = load_config(model) if model.model_name_or_path else model_config(model, tokenizer, block_size=block_size)
    limit = max_positions(config)
    if limit and block_size > limit:
        raise ConfigError(f"--block_size {block_size} exceeds the model's {limit} positions")
    keep_alive = (transformers.integrations.HfDeepSpeedConfig(ds_config)
                  if ds_config["zero_optimization"]["stage"] == 3 else None)
    try:
        if model.model_name_or_path:
            built = from_pretrained(auto, model.model_name_or_path, config=config, revision=model.model_revision,
                                    trust_remote_code=model.trust_remote_code)
        else:
            built = auto.from_config(config, trust_remote_code=model.trust_remote_code)
    except ValueError as error:  # e.g. a GPT-2 config for --task mlm
        raise ConfigError(f"cannot build a {model.task} model from {model.model_name_or_path or model.config_name}: "
                          f"{error}") from None
    wanted, has = tokenizer_vocab_size(tokenizer), built.get_input_embeddings().num_embeddings
    if wanted > has:
        if "vocab_size" in (model.config_overrides or ""):
            warn(f"--config_overrides sets vocab_size {has}, but the tokenizer has {wanted} ids: the model's "
                 f"embeddings are resized to {wanted}")
        built.resize_token_embeddings(wanted)
    if model.gradient_checkpointing:
        built.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(model.gradient_checkpointing_kwargs) or None)
    if model.torch_compile:
        # In place (nn.Module.compile): parameter names, checkpoints and save_pretrained stay the model's own.
        # The transformer only: the loss heads' chunked autograd Function runs eagerly after it.
        built.base_model.compile(backend=model.torch_compile_backend or "inductor",
                                 **({"mode": model.torch_compile_mode} if model.torch_compile_mode else {}))
    return built, keep_alive


def write_model(engine, tokenizer, directory, rank):
    """save_pretrained of the model and tokenizer into directory (rank 0); ZeRO-3 first gathers the
    partitioned weights (every rank takes part)."""
    state_dict = None
    if engine.zero_optimization_partition_weights():
        # Named as the engine's module (heads.LMLoss) holds them: "model.<name>"
        state_dict = {name.removeprefix("model."): tensor
                      for name, tensor in engine._zero3_consolidated_16bit_state_dict().items()}
    if rank != 0:
        return
    engine.module.model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def save_model(engine, tokenizer, directory, rank):
    """The model and tokenizer into directory (the output_dir, where run_clm.py leaves them), staged in a
    temporary directory first (write_model)."""
    tmp = directory / ".tmp-model"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    write_model(engine, tokenizer, tmp, rank)
    if rank == 0:
        outputs.publish_model(tmp, directory)


def param_groups(model, weight_decay):
    """AdamW decays matrices only: biases and norm weights are 1-D (nanoGPT's rule)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # under ZeRO-3 p.shape is the empty local partition
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _numel(parameters):
    """How many numbers the parameters hold (ZeRO-3's partitioned ones by their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def flops_per_token(model, block_size, *, sparse_head=None, predicted=1.0):
    """6N for the matmuls of forward + backward, plus attention's 12 * layers * width * context (PaLM). A
    sparse MLM head runs at a fraction ``predicted`` of the tokens: its parameters count for that fraction."""
    config = model.config
    n = _numel(model.parameters())
    if sparse_head is not None:
        n -= (1 - predicted) * _numel(sparse_head.parameters())
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    return 6 * n + 12 * layers * width * block_size


def trainer_flops_per_token(model):
    """Trainer's total_flos per token: 6 x the parameters outside embedding layers
    (PreTrainedModel.num_parameters(exclude_embeddings=True)); its sizes under ZeRO-3 too."""
    embeddings = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)}
    return 6 * _numel(p for name, p in model.named_parameters() if name not in embeddings)


def default_block_size(model, tokenizer):
    """run_clm.py's block size without --block_size: the tokenizer's model_max_length, or where that exceeds
    the model's positions, min(1024, positions); run_mlm.py's without --max_seq_length: model_max_length
    capped at 1024. (block size, why) for the log line."""
    limit = tokenizer.model_max_length
    if model.task == "mlm":
        if limit > 1024:
            return 1024, f"run_mlm.py's cap of 1024 (the tokenizer's model_max_length is {limit})"
        return limit, "the tokenizer's model_max_length, as run_mlm.py"
    if model.config_name in PRESETS:  # a preset's positions follow the block size: GPT-2's default ones
        positions = CONFIG_MAPPING[PRESETS[model.config_name][0]]().max_position_embeddings
    else:
        positions = max_positions(load_config(model))
    if limit > positions:
        return min(1024, positions), (f"min(1024, the model's {positions} positions), as run_clm.py when the "
                                      f"tokenizer's model_max_length ({limit}) exceeds them")
    return limit, "the tokenizer's model_max_length, as run_clm.py"


def model_inputs(batch, config, *, task, dtype):
    """The model's keyword arguments for a batch of tensors. Batches of whole documents packed together
    (only pack_documents gives position_ids) get attention that stops at document boundaries.

    Causal LMs: transformers 5 finds the documents from position_ids restarting at 0
    (masking_utils.find_packed_sequence_indices), but only with no attention_mask and no KV cache, so
    both go. The padding after the last document has position 0 and label -100: each pad token is a
    one-token document of its own, attended by nothing else.
    Encoders (RoBERTa, BERT): create_bidirectional_mask ignores position_ids, so they get a 4-D
    block-diagonal mask from transformers' own mask builder (a 4-D mask is used as given), in the
    form the model's attention implementation (sdpa, eager) expects. Position ids that all start at
    an offset (RoBERTa's padding_idx + 1) mark documents the same way.
    Limitation: with flash attention (not the runner's default) the 4-D mask is not used.
    """
    if "position_ids" not in batch:
        return batch
    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    if task == "clm":
        return {**inputs, "use_cache": False}  # GPT-2's config says use_cache=True
    documents = find_packed_sequence_indices(batch["position_ids"])
    if documents is None:  # one document a row, no padding: the plain mask is right
        return batch
    shape_only = torch.empty(*batch["input_ids"].shape, 0, dtype=dtype, device=batch["input_ids"].device)
    inputs["attention_mask"] = create_bidirectional_mask(
        config, shape_only, None, and_mask_function=packed_sequence_mask_function(documents))
    return inputs
