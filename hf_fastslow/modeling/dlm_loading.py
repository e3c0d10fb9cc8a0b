"""Load public diffusion-LM checkpoints into native transformers classes, without `trust_remote_code`.

`load_as_hf(path)` reads the checkpoint's config.json, picks the family (SDAR / TraDo / I-DLM / Dream / LLaDA, see
`detect_family`), builds the matching native config, loads the weights (renamed where the family uses its own
parameter names) and attaches a `BlockDiffusionConfig` (mask id, block size, logit shift, attention pattern):

| family | on disk (model_type / architectures) | loaded as | names | attention, shift |
|---|---|---|---|---|
| sdar, trado | "sdar" / SDARForCausalLM | Qwen3ForCausalLM | Qwen3's own | block, no shift |
| idlm | "sdar" / SDARForCausalLM (pass family="idlm") | Qwen3ForCausalLM | Qwen3's own | causal, shift |
| dream | "Dream" / DreamModel | Qwen2ForCausalLM, `is_causal=False` | Qwen2's own | bidirectional, shift |
| llada | "llada" / LLaDAModelLM | LlamaForCausalLM, `is_causal=False` | `LLADA_KEY_MAPPING` | bidirectional, no shift |

The loaded model is a plain transformers model: `save_pretrained` writes native names and a native config.json, which
`from_pretrained` (or `load_as_hf`, family "native") reads back with the `BlockDiffusionConfig` still attached.
Every load is strict: a missing, unexpected or mis-shaped weight raises instead of leaving a random tensor in place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, block_diffusion_config

__all__ = [
    "DLM_FAMILIES",
    "LLADA_KEY_MAPPING",
    "detect_family",
    "dlm_native_config",
    "load_as_hf",
    "read_checkpoint_config",
]

DLM_FAMILIES = ("sdar", "trado", "idlm", "dream", "llada", "native")

# What each family's model is, beyond its weights. Block sizes: SDAR/TraDo/I-DLM keep config.json's `block_size` when
# present; LLaDA's and Dream's block length is a decoding choice (LLaDA's README decodes with 32), not a model field.
_FAMILY_BEHAVIOUR = {
    "sdar": {"attention": "block", "logit_shift": False, "block_size": 4},
    "trado": {"attention": "block", "logit_shift": False, "block_size": 4},
    "idlm": {"attention": "causal", "logit_shift": True, "block_size": 4},
    "dream": {"attention": "bidirectional", "logit_shift": True, "block_size": 32},
    "llada": {"attention": "bidirectional", "logit_shift": False, "block_size": 32},
}

# config.json fields of SDAR-style checkpoints that are no Qwen3 field: moved into BlockDiffusionConfig (block_size,
# mask_token_id) or dropped (training-only switches of the remote code; `attn_implementation: flex_attention` would
# otherwise force flex attention on a CPU load).
_SDAR_NON_QWEN3_FIELDS = (
    "block_size", "mask_token_id", "fuse_cross_entropy", "attn_implementation", "debug", "ep_size", "micro_forward",
    "skip_checkpoint", "use_deepep", "auto_map", "architectures", "model_type", "transformers_version",
)
_DREAM_NON_QWEN2_FIELDS = ("mask_token_id", "auto_map", "architectures", "model_type", "transformers_version")

# LLaDA (GSAI-ML/LLaDA-8B-*, remote `modeling_llada.py`, OLMo-derived `LLaDALlamaBlock`) parameter names -> Llama's.
# Read from the remote code: per block attn_norm, q_proj/k_proj/v_proj, attn_out, ff_norm, ff_proj (the SiLU-gated
# input), up_proj, ff_out (down projection); the model has wte, ln_f and, untied, a final ff_out (the LM head).
LLADA_KEY_MAPPING = {
    r"model\.transformer\.wte": "model.embed_tokens",
    r"model\.transformer\.ln_f": "model.norm",
    r"model\.transformer\.ff_out": "lm_head",
    r"model\.transformer\.blocks\.(\d+)\.attn_norm": r"model.layers.\1.input_layernorm",
    r"model\.transformer\.blocks\.(\d+)\.q_proj": r"model.layers.\1.self_attn.q_proj",
    r"model\.transformer\.blocks\.(\d+)\.k_proj": r"model.layers.\1.self_attn.k_proj",
    r"model\.transformer\.blocks\.(\d+)\.v_proj": r"model.layers.\1.self_attn.v_proj",
    r"model\.transformer\.blocks\.(\d+)\.attn_out": r"model.layers.\1.self_attn.o_proj",
    r"model\.transformer\.blocks\.(\d+)\.ff_norm": r"model.layers.\1.post_attention_layernorm",
    r"model\.transformer\.blocks\.(\d+)\.ff_proj": r"model.layers.\1.mlp.gate_proj",
    r"model\.transformer\.blocks\.(\d+)\.up_proj": r"model.layers.\1.mlp.up_proj",
    r"model\.transformer\.blocks\.(\d+)\.ff_out": r"model.layers.\1.mlp.down_proj",
}
# The OLMo "sequential" block LLaDA's code also carries: one fused att_proj (q | k | v rows) and one ff_proj whose
# output SwiGLU chunks as (x, gate) -> silu(gate) * x. No public LLaDA checkpoint is known to use it; split explicitly.
_LLADA_FUSED_ATTENTION = re.compile(r"model\.transformer\.blocks\.(\d+)\.att_proj\.weight")
_LLADA_FUSED_FF = re.compile(r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight")

_REQUIRED = {
    "sdar": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "dream": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "llada": ("d_model", "n_heads", "n_layers", "vocab_size"),
}


# --------------------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------------------
def read_checkpoint_config(path: str | os.PathLike, **hub_kwargs) -> dict:
    """config.json of a local folder or a Hub repo (through the Hub cache), as a dict."""
    local = os.path.join(os.fspath(path), "config.json")
    if os.path.isdir(os.fspath(path)):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{path} has no config.json.")
        with open(local, encoding="utf-8") as fh:
            return json.load(fh)
    from transformers.utils import cached_file

    hub_keys = ("revision", "token", "cache_dir", "local_files_only", "subfolder")
    keep = {k: hub_kwargs[k] for k in hub_keys if k in hub_kwargs}
    with open(cached_file(os.fspath(path), "config.json", **keep), encoding="utf-8") as fh:
        return json.load(fh)


def detect_family(config: Mapping[str, Any]) -> str:
    """The family of a checkpoint from its config.json: "native" when hf_fastslow saved it (a `block_diffusion` entry),
    else by model_type / architectures. SDAR, TraDo and I-DLM share model_type "sdar"; detection answers "sdar", and
    an I-DLM checkpoint needs `family="idlm"` (its shift and strict causal attention are not in its config)."""
    if "block_diffusion" in config:
        return "native"
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    if model_type == "sdar" or "SDARForCausalLM" in architectures:
        return "sdar"
    if model_type == "dream" or "DreamModel" in architectures:
        return "dream"
    if model_type == "llada" or "LLaDAModelLM" in architectures:
        return "llada"
    hint = ""
    if "moe" in model_type or any("Moe" in a for a in architectures):
        hint = " Mixture-of-experts variants (SDAR-30B-A3B, LLaDA-MoE, LLaDA2.x) are not supported."
    raise ValueError(
        f"cannot tell the diffusion-LM family of model_type={config.get('model_type')!r}, "
        f"architectures={architectures}: pass family= one of {DLM_FAMILIES[:-1]}.{hint}"
    )


def _require(config: Mapping[str, Any], family: str) -> None:
    missing = [k for k in _REQUIRED[family] if config.get(k) is None]
    if missing:
        raise ValueError(f"{family} config.json lacks required field(s) {missing}.")


def _sdar_native_config(config: dict):
    from transformers import Qwen3Config

    _require(config, "sdar")
    fields = {k: v for k, v in config.items() if k not in _SDAR_NON_QWEN3_FIELDS}
    if "torch_dtype" in fields:
        fields.setdefault("dtype", fields.pop("torch_dtype"))
    heads, kv_heads = fields["num_attention_heads"], fields.get("num_key_value_heads") or fields["num_attention_heads"]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}.")
    return Qwen3Config(**fields)


def _dream_native_config(config: dict):
    from transformers import Qwen2Config

    _require(config, "dream")
    fields = {k: v for k, v in config.items() if k not in _DREAM_NON_QWEN2_FIELDS}
    if "torch_dtype" in fields:
        fields.setdefault("dtype", fields.pop("torch_dtype"))
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}.")
    native = Qwen2Config(**fields)
    native.is_causal = False
    return native


def _llada_unsupported(config: Mapping[str, Any]) -> list[str]:
    """LLaDA config switches whose computation a Llama does not do (each would need its own module, not a rename)."""
    rules = {
        "alibi": False, "rope": True, "input_emb_norm": False, "scale_logits": False, "attention_layer_norm": False,
        "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False, "layer_norm_with_affine": True,
        "block_group_size": 1, "layer_norm_type": "rms",
    }
    return [f"{k}={config[k]!r} (supported: {v!r})" for k, v in rules.items() if k in config and config[k] != v]


def _llada_native_config(config: dict):
    from transformers import LlamaConfig

    _require(config, "llada")
    bad = _llada_unsupported(config)
    block_type = config.get("block_type", "llama")
    activation = config.get("activation_type", "silu" if block_type == "llama" else "swiglu")
    if block_type == "llama" and activation != "silu":
        bad.append(f"activation_type={activation!r} with block_type 'llama' (supported: 'silu')")
    if block_type == "sequential" and activation != "swiglu":
        bad.append(f"activation_type={activation!r} with block_type 'sequential' (supported: 'swiglu')")
    if block_type not in ("llama", "sequential"):
        bad.append(f"block_type={block_type!r} (supported: 'llama', 'sequential')")
    if bad:
        raise ValueError("LLaDA config not loadable as a Llama: " + "; ".join(bad))
    d_model, heads = int(config["d_model"]), int(config["n_heads"])
    kv_heads = config.get("n_kv_heads") or (1 if config.get("multi_query_attention") else heads)
    if d_model % heads or heads % kv_heads:
        raise ValueError(f"LLaDA d_model {d_model}, n_heads {heads}, n_kv_heads {kv_heads} do not divide evenly.")
    mlp_hidden = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    if block_type == "sequential":  # SwiGLU halves the fused ff_proj output
        if mlp_hidden % 2:
            raise ValueError(f"fused LLaDA ff_proj width {mlp_hidden} is odd: cannot split into up and gate.")
        mlp_hidden //= 2
    native = LlamaConfig(
        vocab_size=int(config.get("embedding_size") or config["vocab_size"]),
        hidden_size=d_model,
        intermediate_size=int(mlp_hidden),
        num_hidden_layers=int(config["n_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        max_position_embeddings=int(config.get("max_sequence_length", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
    )
    native.is_causal = False
    return native


def dlm_native_config(config: Mapping[str, Any], family: str | None = None, *, block_size: int | None = None,
                      mask_token_id: int | None = None):
    """(native transformers config, BlockDiffusionConfig) for a checkpoint's config.json dict. `block_size` /
    `mask_token_id` override what config.json says (they are required where it says nothing)."""
    config = dict(config)
    family = family or detect_family(config)
    if family not in _FAMILY_BEHAVIOUR:
        raise ValueError(f"unknown diffusion-LM family {family!r}: expected one of {DLM_FAMILIES}.")
    if family in ("sdar", "trado", "idlm"):
        native = _sdar_native_config(config)
    elif family == "dream":
        native = _dream_native_config(config)
    else:
        native = _llada_native_config(config)
    behaviour = _FAMILY_BEHAVIOUR[family]
    mask = mask_token_id if mask_token_id is not None else config.get("mask_token_id")
    if mask is None:
        raise ValueError(f"{family} config.json has no mask_token_id: pass mask_token_id=.")
    if int(mask) >= native.vocab_size:
        raise ValueError(f"mask_token_id {mask} is outside the vocabulary ({native.vocab_size}).")
    block = block_size if block_size is not None else config.get("block_size", behaviour["block_size"])
    bd = BlockDiffusionConfig(
        mask_token_id=int(mask), block_size=int(block), logit_shift=behaviour["logit_shift"],
        attention=behaviour["attention"],
    )
    return native, bd


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _check_loading_info(info: Mapping[str, Any], family: str, path) -> None:
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        shown = "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise ValueError(f"{family} checkpoint {path} does not match its config: {shown or info.get('error_msgs')}")


def _checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a local safetensors checkpoint (single file or sharded with an index)."""
    from safetensors.torch import load_file

    root = os.fspath(path)
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.isfile(os.path.join(root, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) to split fused LLaDA weights from.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(os.path.join(root, name)))
    return tensors


def _rename(key: str, mapping: Mapping[str, str]) -> str:
    for pattern, target in mapping.items():
        renamed, n = re.subn(pattern, target, key, count=1)
        if n:
            return renamed
    return key


def _split_fused_llada(tensors: dict[str, torch.Tensor], native) -> dict[str, torch.Tensor]:
    """LLaDA sequential-block tensors -> Llama names: att_proj rows are q | k | v; ff_proj rows are x | gate (SwiGLU
    chunk order), i.e. up_proj then gate_proj."""
    head_dim = native.hidden_size // native.num_attention_heads
    sizes = (native.num_attention_heads * head_dim, native.num_key_value_heads * head_dim,
             native.num_key_value_heads * head_dim)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if m := _LLADA_FUSED_ATTENTION.fullmatch(key):
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{key} has {tensor.shape[0]} rows, the config implies {sum(sizes)} (q | k | v).")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes, dim=0)):
                out[f"model.layers.{m.group(1)}.self_attn.{name}.weight"] = part.contiguous()
        elif m := _LLADA_FUSED_FF.fullmatch(key):
            if tensor.shape[0] != 2 * native.intermediate_size:
                expected = 2 * native.intermediate_size
                raise ValueError(f"{key} has {tensor.shape[0]} rows, the config implies {expected}.")
            up, gate = tensor.chunk(2, dim=0)
            out[f"model.layers.{m.group(1)}.mlp.up_proj.weight"] = up.contiguous()
            out[f"model.layers.{m.group(1)}.mlp.gate_proj.weight"] = gate.contiguous()
        else:
            out[_rename(key, LLADA_KEY_MAPPING)] = tensor
    return out


def load_as_hf(path: str | os.PathLike, family: str | None = None, *, block_size: int | None = None,
               mask_token_id: int | None = None, **from_pretrained_kwargs):
    """Load a diffusion-LM checkpoint into a native transformers class; returns `(model, BlockDiffusionConfig)`.

    `family`: "sdar" | "trado" | "idlm" | "dream" | "llada" | "native" (an hf_fastslow-saved checkpoint), or None to
    detect it from config.json (`detect_family`). `block_size` / `mask_token_id` override the checkpoint's values.
    `from_pretrained_kwargs` go to `from_pretrained` (dtype, device_map, attn_implementation, revision, ...);
    `trust_remote_code` is refused: nothing here runs checkpoint code.
    """
    if from_pretrained_kwargs.pop("trust_remote_code", False):
        raise ValueError("load_as_hf never runs remote code: drop trust_remote_code.")
    if family is not None and family not in DLM_FAMILIES:
        raise ValueError(f"unknown diffusion-LM family {family!r}: expected one of {DLM_FAMILIES}.")
    config = read_checkpoint_config(path, **from_pretrained_kwargs)
    family = family or detect_family(config)
    from_pretrained_kwargs.pop("output_loading_info", None)
    if family == "native":
        return _load_native(path, block_size=block_size, mask_token_id=mask_token_id, **from_pretrained_kwargs)

    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    from hf_fastslow.integrations.dlm_seam import forget_key_mapping

    native, bd = dlm_native_config(config, family, block_size=block_size, mask_token_id=mask_token_id)
    if family == "llada" and config.get("block_type", "llama") == "sequential":
        state_dict = _split_fused_llada(_checkpoint_tensors(path), native)
        model, info = LlamaForCausalLM.from_pretrained(
            None, config=native, state_dict=state_dict, output_loading_info=True, **from_pretrained_kwargs
        )
    elif family == "llada":
        model, info = LlamaForCausalLM.from_pretrained(
            path, config=native, key_mapping=LLADA_KEY_MAPPING, output_loading_info=True, **from_pretrained_kwargs
        )
        # The renames are how this checkpoint is read, not part of the model: saving writes Llama names.
        forget_key_mapping(model, LLADA_KEY_MAPPING)
    else:
        cls = Qwen2ForCausalLM if family == "dream" else Qwen3ForCausalLM
        model, info = cls.from_pretrained(path, config=native, output_loading_info=True, **from_pretrained_kwargs)
    _check_loading_info(info, family, path)
    attach_block_diffusion(model, bd)
    return model.eval(), bd


def _load_native(path, *, block_size=None, mask_token_id=None, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    _check_loading_info(info, "native", path)
    bd = block_diffusion_config(model)
    if block_size is not None or mask_token_id is not None:
        fields = bd.to_dict()
        overrides = {"block_size": block_size, "mask_token_id": mask_token_id}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        bd = BlockDiffusionConfig.from_dict(fields)
        attach_block_diffusion(model, bd)
    return model.eval(), bd
