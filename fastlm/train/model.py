"""The model a run trains: built from a preset, a config or a checkpoint, and fed packed batches.

transformers and torch are imported inside the functions: importing this module stays light.
"""
from fastlm.config import PRESETS, ConfigError, apply_config_overrides, load_config
from fastlm.tokenizer import vocab_size as tokenizer_vocab_size


def model_config(args, tokenizer):
    """The config of a model trained from scratch: a preset shaped to the tokenizer, else what run_clm.py
    builds (--config_name, or --model_type's defaults), with --config_overrides applied either way."""
    from transformers import CONFIG_MAPPING

    if args.config_name in PRESETS:
        model_type, shape = PRESETS[args.config_name]
        specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        if model_type == "gpt2":
            extra = dict(n_positions=max(args.block_size, 1024 if args.config_name == "gpt2-124m" else 0))
        else:  # RoBERTa's positions start after the padding index
            extra = dict(max_position_embeddings=args.block_size + 2, type_vocab_size=1 if model_type == "roberta" else 2)
        specials = {k: v for k, v in specials.items() if v is not None}
        config = CONFIG_MAPPING[model_type](vocab_size=tokenizer_vocab_size(tokenizer), **shape, **extra, **specials)
        apply_config_overrides(config, args.config_overrides)
        return config
    return load_config(args)


def position_offset(config):
    """Where a model's position ids start: RoBERTa-style embeddings number positions after the padding
    index (HF's create_position_ids_from_input_ids), others from 0."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") and config.pad_token_id is not None:
        return config.pad_token_id + 1
    return 0


def max_positions(config):
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return n - position_offset(config) if n else n


def build_model(args, tokenizer, ds_config):
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if args.task == "clm" else AutoModelForMaskedLM
    # With --model_name_or_path, --config_name (if any) is the config its weights load into, as in run_clm.py.
    config = load_config(args) if args.model_name_or_path else model_config(args, tokenizer)
    limit = max_positions(config)
    if limit and args.block_size > limit:
        raise ConfigError(f"--block_size {args.block_size} exceeds the model's {limit} positions")
    # ZeRO-3 builds the model partitioned (deepspeed.zero.Init) only while an HfDeepSpeedConfig is
    # alive; without it from_config skips HF's weight init. The caller keeps it alive.
    keep_alive = transformers.integrations.HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    try:
        if args.model_name_or_path:
            model = auto.from_pretrained(args.model_name_or_path, config=config, revision=args.model_revision,
                                         trust_remote_code=args.trust_remote_code)
        else:
            model = auto.from_config(config, trust_remote_code=args.trust_remote_code)
    except ValueError as error:  # e.g. a GPT-2 config for --task mlm
        raise ConfigError(f"cannot build a {args.task} model from {args.model_name_or_path or args.config_name}: {error}") from None
    if tokenizer_vocab_size(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer_vocab_size(tokenizer))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or None)
    return model, keep_alive


def param_groups(model, weight_decay):
    """AdamW decays matrices only: biases and norm weights are 1-D (nanoGPT's rule)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # under ZeRO-3 p.shape is the empty local partition
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(model, block_size):
    """6N for the matmuls of forward + backward, plus attention's 12 * layers * width * context (PaLM)."""
    config = model.config
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    return 6 * n + 12 * layers * width * block_size


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
    import torch
    from transformers.masking_utils import (create_bidirectional_mask, find_packed_sequence_indices,
                                            packed_sequence_mask_function)

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
