"""The one seam between hf_fastslow and transformers/trl/diffusers internals: registries, patches, version gates.

Everything here is version-gated and tested against every transformers release we support (5.17 → <6).
Other modules never reach into private transformers/trl APIs; they call the helpers re-exported below.
One module per seam: `caches` (the cache keyword, `generate(cache_implementation=...)`), `attention`
(attention registrations), `modeling` (decoder layers, rotary, GGUF loading), `generation` (what custom
decoding loops need from `generate`), `trl` (the GRPOTrainer internals our trainers and rollout hooks use),
`diffusers` (Wan video transformers; diffusers is imported only when called), `attention_capture` (post-RoPE q/k/v of
any layer), and one small seam per method that needs its own: `iha_seam`, `care_seam`, `steering_seam`, and for the
diffusion LMs `block_diffusion_seam` (generate's dropped call arguments), `dlm_seam` (diffusers' LLaDA2Pipeline peer,
key-mapping renames), `dlm_trainer_seam` (peft aLoRA checkpoint hooks), `isd_seam` (peft aLoRA offsets) and
`isd_batch_seam` (stationary-batch cache layout); `backends_seam` (huggingface_hub's offline switch must not block
the endpoint backend's named server).
"""

from __future__ import annotations

import warnings

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS = Version("6.0.0")

if not (MIN_TRANSFORMERS <= Version(TRANSFORMERS_VERSION.base_version) < MAX_TRANSFORMERS):
    warnings.warn(
        f"hf_fastslow is tested with transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}; "
        f"found {transformers.__version__}.",
        stacklevel=2,
    )

# The gate above runs before any seam module is imported. noqa: E402 (on purpose).
from hf_fastslow.integrations.attention import (  # noqa: E402
    attention_implementation,
    register_attention,
    sdpa_attention_function,
    set_attention_implementation,
)
from hf_fastslow.integrations.attention_capture import (  # noqa: E402
    CAPTURE_ATTENTION,
    attention_modules,
    capture_attention_inputs,
)
from hf_fastslow.integrations.backends_seam import endpoint_requests_allowed, hub_transport_error  # noqa: E402
from hf_fastslow.integrations.block_diffusion_seam import generate_call_arguments  # noqa: E402
from hf_fastslow.integrations.caches import (  # noqa: E402
    CacheFactory,
    cache_from_kwargs,
    cache_kwarg_name,
    cache_kwargs,
    output_cache,
    register_cache_implementation,
    registered_cache_implementations,
    unregister_cache_implementation,
)
from hf_fastslow.integrations.care_seam import (  # noqa: E402
    attention_function,
    cache_layer_length,
    cache_update,
    query_offset,
)
from hf_fastslow.integrations.diffusers import (  # noqa: E402
    VIDEO_EXTRA_HINT,
    WanSelfAttentionProcessor,
    check_wan_transformer,
    diffusers_available,
    require_diffusers,
    restore_wan_self_attention_processors,
    sdpa_bshd,
    set_wan_self_attention_mask,
    set_wan_self_attention_processors,
    wan_apply_rotary,
    wan_attention_output,
    wan_frame_offset,
    wan_patch_grid,
    wan_qkv,
    wan_rotary,
    wan_self_attention_modules,
    wan_to_dtype,
    watch_wan_input_grid,
)
from hf_fastslow.integrations.dlm_seam import (  # noqa: E402
    LLaDA2PeerOutput,
    forget_key_mapping,
    llada2_pipeline_available,
    run_llada2_pipeline,
)
from hf_fastslow.integrations.dlm_trainer_seam import release_alora_checkpoint_hooks  # noqa: E402
from hf_fastslow.integrations.generation import (  # noqa: E402
    GenerateSpecialTokens,
    decoder_only_generate_output,
    generate_special_tokens,
    model_is_stateful,
    speculative_cache_check,
    speculative_cache_compactable,
    speculative_call_shifted,
    speculative_compact_cache,
    speculative_crop,
    speculative_forward,
    speculative_prepare_cache,
    speculative_processor_shift_safe,
    split_stopping_criteria,
)
from hf_fastslow.integrations.iha_seam import (  # noqa: E402
    IHA_MODEL_TYPES,
    causal_lm_class,
    from_pretrained_with_modules,
    iha_mask,
    iha_unsupported_reason,
    register_iha_attention,
)
from hf_fastslow.integrations.isd_batch_seam import (  # noqa: E402
    check_stationary_cache,
    compact_cache_columns,
    make_stationary_cache,
)
from hf_fastslow.integrations.isd_seam import alora_layers, alora_offsets, unwrap_peft_model, uses_alora  # noqa: E402
from hf_fastslow.integrations.modeling import (  # noqa: E402
    apply_rotary_fn,
    decoder_layers,
    rotary_embeddings,
    rotary_module,
    strip_gguf_quantization,
)
from hf_fastslow.integrations.slimming_seam import (  # noqa: E402
    SlimLlamaConfig,
    SlimLlamaForCausalLM,
    SlimLlamaModel,
    SlimResNetConfig,
    SlimResNetForImageClassification,
    SlimResNetModel,
    SlimViTConfig,
    SlimViTForImageClassification,
    SlimViTModel,
    layer_config,
    register_slim_models,
    slim_class_for,
)
from hf_fastslow.integrations.steering_seam import (  # noqa: E402
    AttentionOutputSites,
    attention_output_sites,
    call_cache_length,
    call_input_ids,
    layer_hidden_output,
    with_layer_hidden_output,
)
from hf_fastslow.integrations.trl import (  # noqa: E402
    FST_GRPO_HOOKS,
    PAIRRL_GRPO_HOOKS,
    check_grpo_hooks,
    fst_generation_model,
    fst_log_metric,
    grpo_loss_types,
    grpo_metric_buffer,
    pairrl_merge_generation_batches,
    trl_generation_context,
    trl_metric_buffer,
    trl_pad_token_id,
    trl_tokenize_prompts,
    trl_tokenizer,
)
from hf_fastslow.integrations.vision_seam import (  # noqa: E402
    backbone_config_from,
    backbone_from_config,
    declare_backbone_sub_config,
    register_auto_model,
    register_image_classification_model,
)

__all__ = [
    "SlimLlamaConfig",
    "SlimLlamaModel",
    "SlimLlamaForCausalLM",
    "SlimViTConfig",
    "SlimViTModel",
    "SlimViTForImageClassification",
    "SlimResNetConfig",
    "SlimResNetModel",
    "SlimResNetForImageClassification",
    "layer_config",
    "slim_class_for",
    "register_slim_models",
    "backbone_config_from",
    "backbone_from_config",
    "declare_backbone_sub_config",
    "register_auto_model",
    "register_image_classification_model",
    "CAPTURE_ATTENTION",
    "FST_GRPO_HOOKS",
    "IHA_MODEL_TYPES",
    "MAX_TRANSFORMERS",
    "MIN_TRANSFORMERS",
    "PAIRRL_GRPO_HOOKS",
    "TRANSFORMERS_VERSION",
    "VIDEO_EXTRA_HINT",
    "AttentionOutputSites",
    "CacheFactory",
    "GenerateSpecialTokens",
    "WanSelfAttentionProcessor",
    "apply_rotary_fn",
    "attention_function",
    "attention_implementation",
    "attention_modules",
    "attention_output_sites",
    "cache_from_kwargs",
    "cache_kwarg_name",
    "cache_kwargs",
    "cache_layer_length",
    "cache_update",
    "call_cache_length",
    "call_input_ids",
    "capture_attention_inputs",
    "causal_lm_class",
    "check_grpo_hooks",
    "check_wan_transformer",
    "decoder_layers",
    "decoder_only_generate_output",
    "diffusers_available",
    "from_pretrained_with_modules",
    "fst_generation_model",
    "fst_log_metric",
    "generate_special_tokens",
    "grpo_loss_types",
    "grpo_metric_buffer",
    "iha_mask",
    "iha_unsupported_reason",
    "layer_hidden_output",
    "model_is_stateful",
    "output_cache",
    "pairrl_merge_generation_batches",
    "query_offset",
    "register_attention",
    "register_cache_implementation",
    "register_iha_attention",
    "registered_cache_implementations",
    "require_diffusers",
    "restore_wan_self_attention_processors",
    "rotary_embeddings",
    "rotary_module",
    "sdpa_attention_function",
    "sdpa_bshd",
    "set_attention_implementation",
    "set_wan_self_attention_mask",
    "set_wan_self_attention_processors",
    "speculative_cache_check",
    "speculative_cache_compactable",
    "speculative_call_shifted",
    "speculative_compact_cache",
    "speculative_crop",
    "speculative_forward",
    "speculative_prepare_cache",
    "speculative_processor_shift_safe",
    "split_stopping_criteria",
    "strip_gguf_quantization",
    "trl_generation_context",
    "trl_metric_buffer",
    "trl_pad_token_id",
    "trl_tokenize_prompts",
    "trl_tokenizer",
    "unregister_cache_implementation",
    "wan_apply_rotary",
    "wan_attention_output",
    "wan_frame_offset",
    "wan_patch_grid",
    "wan_qkv",
    "wan_rotary",
    "wan_self_attention_modules",
    "wan_to_dtype",
    "watch_wan_input_grid",
    "with_layer_hidden_output",
    "generate_call_arguments",
    "LLaDA2PeerOutput",
    "forget_key_mapping",
    "llada2_pipeline_available",
    "run_llada2_pipeline",
    "release_alora_checkpoint_hooks",
    "check_stationary_cache",
    "compact_cache_columns",
    "make_stationary_cache",
    "alora_layers",
    "alora_offsets",
    "unwrap_peft_model",
    "uses_alora",
    "endpoint_requests_allowed",
    "hub_transport_error",
]
