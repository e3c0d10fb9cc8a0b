"""The one seam between hf_fastslow and transformers/trl internals: registries, patches, version gates.

Everything here is version-gated and tested against every transformers release we support (5.17 → <6).
Other modules never reach into private transformers/trl APIs; they call the helpers re-exported below.
One module per seam: `caches` (the cache keyword, `generate(cache_implementation=...)`), `attention`
(attention registrations), `modeling` (decoder layers, rotary, GGUF loading), `generation` (what custom
decoding loops need from `generate`), `trl` (the GRPOTrainer internals our trainers and rollout hooks use).
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
from hf_fastslow.integrations.attention import register_attention  # noqa: E402
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
from hf_fastslow.integrations.modeling import (  # noqa: E402
    apply_rotary_fn,
    decoder_layers,
    rotary_embeddings,
    rotary_module,
    strip_gguf_quantization,
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
    trl_pad_token_id,
    trl_tokenize_prompts,
    trl_tokenizer,
)

__all__ = [
    "FST_GRPO_HOOKS",
    "MAX_TRANSFORMERS",
    "MIN_TRANSFORMERS",
    "PAIRRL_GRPO_HOOKS",
    "TRANSFORMERS_VERSION",
    "CacheFactory",
    "GenerateSpecialTokens",
    "apply_rotary_fn",
    "cache_from_kwargs",
    "cache_kwarg_name",
    "cache_kwargs",
    "check_grpo_hooks",
    "decoder_layers",
    "decoder_only_generate_output",
    "fst_generation_model",
    "fst_log_metric",
    "generate_special_tokens",
    "grpo_loss_types",
    "grpo_metric_buffer",
    "model_is_stateful",
    "output_cache",
    "pairrl_merge_generation_batches",
    "register_attention",
    "register_cache_implementation",
    "registered_cache_implementations",
    "rotary_embeddings",
    "rotary_module",
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
    "trl_pad_token_id",
    "trl_tokenize_prompts",
    "trl_tokenizer",
    "unregister_cache_implementation",
]
