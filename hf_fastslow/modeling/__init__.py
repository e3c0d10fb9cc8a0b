"""Attention functions and model surgery: IHA (interleaved head attention), CARE (GQA -> latent K/V), SVG-EAR sparse
attention, and the QVG video KV cache for autoregressive Wan transformers (with its chunk-by-chunk driver).

Nothing here imports diffusers at import time: the video pieces need it (`pip install 'hf_fastslow[video]'`) only when
they are called."""

from .block_diffusion import (
    ATTENTION_PATTERNS,
    BlockDiffusionCache,
    BlockDiffusionConfig,
    additive_attention_mask,
    attach_block_diffusion,
    block_attention_mask,
    block_diffusion_config,
    ensure_mask_token,
    model_attention_mask,
)
from .block_diffusion_training import (
    diffusion_targets,
    noisy_inputs,
    training_mask_2l,
    two_half_position_ids,
)
from .care import (
    KVMoments,
    care_kv_bytes_per_token,
    collect_kv_second_moments,
    convert_gqa_to_mla,
    from_pretrained_care,
    kv_width,
    latent_widths,
    svd_baseline,
)
from .care_config import CAREConfig, allocate_ranks
from .concept_bottleneck import (
    ConceptBottleneckConfig,
    ConceptBottleneckModel,
    ConceptBottleneckOutput,
    intervene,
    validate_concept_groups,
)
from .concept_digits import load_concept_digits
from .conv4 import Conv4Config, Conv4ForImageClassification, resnet_for_few_shot, use_batch_statistics
from .dlm_checkpoint import save_dlm_checkpoint
from .dlm_loading import DLM_FAMILIES, LLADA_KEY_MAPPING, detect_family, load_as_hf
from .ear import EARConfig, EARWanProcessor, apply_ear, disable_ear_attention, enable_ear_attention, remove_ear
from .frozen_cache import FrozenContextCache
from .iha import (
    IHA_MODULES_TO_SAVE,
    IHAConfig,
    IHAMixer,
    apply_iha,
    from_pretrained_iha,
    iha_param_group,
    iha_parameters,
    is_iha_model,
    mark_only_iha_trainable,
)
from .kernel_gates import KernelGate, KernelGates, attach_kernel_gates
from .losa import LosaConfig, LosaState, kv_density, losa_attention, register_losa
from .readout import EarlyReadoutHead, TokenReadoutHead
from .slimming import SlimConfig, SlimMasks, attach_slim_masks, count_params_flops, slice_model
from .trackers import (
    OneStreamViTTracker,
    SiameseCNNTracker,
    TrackingPairs,
    evaluate_tracker,
    make_sequence,
    precision_at,
    success_auc,
)
from .video_kv import (
    VideoKVAttnProcessor,
    VideoKVCache,
    VideoKVConfig,
    apply_qvg,
    remove_qvg,
    video_kv_cache_of,
)
from .wan_autoregressive import flow_sigmas, wan_autoregressive_rollout

__all__ = [
    "CAREConfig",
    "KVMoments",
    "allocate_ranks",
    "care_kv_bytes_per_token",
    "collect_kv_second_moments",
    "convert_gqa_to_mla",
    "from_pretrained_care",
    "kv_width",
    "latent_widths",
    "svd_baseline",
    "IHA_MODULES_TO_SAVE",
    "EARConfig",
    "EARWanProcessor",
    "IHAConfig",
    "IHAMixer",
    "VideoKVAttnProcessor",
    "VideoKVCache",
    "VideoKVConfig",
    "apply_ear",
    "apply_iha",
    "apply_qvg",
    "disable_ear_attention",
    "enable_ear_attention",
    "flow_sigmas",
    "from_pretrained_iha",
    "iha_param_group",
    "iha_parameters",
    "is_iha_model",
    "mark_only_iha_trainable",
    "remove_ear",
    "remove_qvg",
    "video_kv_cache_of",
    "wan_autoregressive_rollout",
    "ATTENTION_PATTERNS",
    "BlockDiffusionCache",
    "BlockDiffusionConfig",
    "attach_block_diffusion",
    "block_attention_mask",
    "block_diffusion_config",
    "ensure_mask_token",
    "model_attention_mask",
    "additive_attention_mask",
    "diffusion_targets",
    "noisy_inputs",
    "training_mask_2l",
    "two_half_position_ids",
    "save_dlm_checkpoint",
    "DLM_FAMILIES",
    "LLADA_KEY_MAPPING",
    "detect_family",
    "load_as_hf",
    "FrozenContextCache",
    "LosaConfig",
    "LosaState",
    "kv_density",
    "losa_attention",
    "register_losa",
    "EarlyReadoutHead",
    "TokenReadoutHead",
    "ConceptBottleneckConfig",
    "ConceptBottleneckModel",
    "ConceptBottleneckOutput",
    "intervene",
    "validate_concept_groups",
    "load_concept_digits",
    "Conv4Config",
    "Conv4ForImageClassification",
    "resnet_for_few_shot",
    "use_batch_statistics",
    "KernelGate",
    "KernelGates",
    "attach_kernel_gates",
    "SlimConfig",
    "SlimMasks",
    "attach_slim_masks",
    "slice_model",
    "count_params_flops",
    "OneStreamViTTracker",
    "SiameseCNNTracker",
    "make_sequence",
    "TrackingPairs",
    "evaluate_tracker",
    "success_auc",
    "precision_at",
]
