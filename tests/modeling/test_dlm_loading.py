"""load_as_hf on tiny synthetic checkpoints written in each family's on-disk layout (config.json fields and parameter
names as the public checkpoints' remote code defines them; no checkpoint can be downloaded here).

Every weight must land where the family's own computation uses it: the loaded model's logits are compared with a
reference forward written here from the remote code's math, reading the checkpoint's tensors under their ORIGINAL
names (so a wrong rename, a swapped gate/up, a q|k|v split in the wrong order or a causal mask on a bidirectional model
all fail)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hf_fastslow.modeling.dlm_loading import (
    DLM_FAMILIES,
    LLADA_KEY_MAPPING,
    detect_family,
    dlm_native_config,
    load_as_hf,
)

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, MASK = 128, 64, 4, 2, 2, 96, 120


# --------------------------------------------------------------------------------------------------------------------
# Reference forward (own code, from the remote modeling files' math)
# --------------------------------------------------------------------------------------------------------------------
def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, theta):  # x [B, H, T, d]; half-split rotation as Llama/Qwen/LLaDA
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _qkv(layer, h):
    if "att_proj" in layer:  # LLaDASequentialBlock: one fused projection, rows q | k | v
        return F.linear(h, layer["att_proj"]).split(layer["fused_dims"], dim=-1)
    return tuple(F.linear(h, layer[n], layer.get(n + "_bias")) for n in ("q", "k", "v"))


def _mlp(layer, h):
    if "ff_fused" in layer:  # SwiGLU over a fused projection: x, gate = chunk(2); silu(gate) * x
        x, gate = F.linear(h, layer["ff_fused"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * x, layer["down"])
    return F.linear(F.silu(F.linear(h, layer["gate"])) * F.linear(h, layer["up"]), layer["down"])


def reference_logits(ids, *, embed, layers, norm, head, heads, kv_heads, head_dim, theta, eps, causal):
    """layers: dicts of tensors: attn_norm, ff_norm, q/k/v (+ _bias) or att_proj (+ fused_dims), o, gate/up/down or
    ff_fused/down, and optional q_norm / k_norm (per-head RMSNorm weights, Qwen3)."""
    x = embed[ids]
    b, t = ids.shape
    for layer in layers:
        q, k, v = _qkv(layer, _rms(x, layer["attn_norm"], eps))
        q = q.reshape(b, t, heads, head_dim)
        k = k.reshape(b, t, kv_heads, head_dim)
        if "q_norm" in layer:
            q, k = _rms(q, layer["q_norm"], eps), _rms(k, layer["k_norm"], eps)
        q, k = _rope(q.transpose(1, 2), theta), _rope(k.transpose(1, 2), theta)
        v = v.reshape(b, t, kv_heads, head_dim).transpose(1, 2)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * head_dim)
        x = x + att @ layer["o"].T
        x = x + _mlp(layer, _rms(x, layer["ff_norm"], eps))
    return _rms(x, norm, eps) @ head.T


# --------------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _t(*shape):
    return torch.randn(*shape) * 0.1


def _write(path, config: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(path / "model.safetensors"), metadata={"format": "pt"})


SDAR_CONFIG = {  # the fields of JetLM/SDAR-*-Chat config.json, at toy size
    "architectures": ["SDARForCausalLM"], "model_type": "sdar",
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig"},
    "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention", "bos_token_id": 1,
    "eos_token_id": 1, "block_size": 4, "mask_token_id": MASK, "ep_size": 1, "fuse_cross_entropy": True,
    "head_dim": 32, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
    "max_position_embeddings": 256, "max_window_layers": 28, "micro_forward": False, "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6, "rope_scaling": None,
    "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "float32", "use_cache": False, "use_deepep": False, "use_sliding_window": False, "vocab_size": VOCAB,
}


def sdar_tensors(head_dim=32, bias=False):
    """Qwen3 names (SDAR/TraDo/I-DLM remote code is transformers' Qwen3 modeling plus masks)."""
    t = {"model.embed_tokens.weight": _t(VOCAB, HIDDEN), "model.norm.weight": 1 + _t(HIDDEN),
         "lm_head.weight": _t(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": 1 + _t(HIDDEN), p + "post_attention_layernorm.weight": 1 + _t(HIDDEN),
            p + "self_attn.q_proj.weight": _t(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": _t(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": _t(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": _t(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": _t(FFN, HIDDEN), p + "mlp.up_proj.weight": _t(FFN, HIDDEN),
            p + "mlp.down_proj.weight": _t(HIDDEN, FFN),
        }
        if head_dim is not None:
            t |= {p + "self_attn.q_norm.weight": 1 + _t(head_dim), p + "self_attn.k_norm.weight": 1 + _t(head_dim)}
        if bias:
            t |= {p + "self_attn.q_proj.bias": _t(HEADS * (HIDDEN // HEADS)),
                  p + "self_attn.k_proj.bias": _t(KV_HEADS * (HIDDEN // HEADS)),
                  p + "self_attn.v_proj.bias": _t(KV_HEADS * (HIDDEN // HEADS))}
    return t


def dream_tensors():
    """Qwen2 names with q/k/v biases (Dream-v0's DreamAttention), no q/k norm, head_dim = hidden / heads."""
    t = sdar_tensors(head_dim=HIDDEN // HEADS, bias=True)
    return {k: v for k, v in t.items() if "q_norm" not in k and "k_norm" not in k}


DREAM_CONFIG = {  # Dream-org/Dream-v0-*-7B config.json fields, at toy size
    "architectures": ["DreamModel"], "model_type": "Dream", "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
    "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1, "hidden_act": "silu", "hidden_size": HIDDEN,
    "initializer_range": 0.02, "intermediate_size": FFN, "mask_token_id": MASK, "max_position_embeddings": 256,
    "max_window_layers": 28, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
    "pad_token_id": 0, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": False, "use_sliding_window": False,
    "vocab_size": VOCAB,
}

LLADA_CONFIG = {  # GSAI-ML/LLaDA-8B-Instruct config.json fields, at toy size
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": HIDDEN, "embedding_dropout": 0.0, "embedding_size": VOCAB,
    "eos_token_id": 1, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": MASK, "max_sequence_length": 256, "mlp_hidden_size": FFN,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
    "n_layers": LAYERS, "pad_token_id": 1, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "use_cache": False,
    "vocab_size": VOCAB, "weight_tying": False,
}


def llada_tensors(tied=False, fused=False):
    """LLaDA-8B parameter names (LLaDAModelLM.model = LLaDAModel; LLaDALlamaBlock / LLaDASequentialBlock)."""
    hd = HIDDEN // HEADS
    t = {"model.transformer.wte.weight": _t(VOCAB, HIDDEN), "model.transformer.ln_f.weight": 1 + _t(HIDDEN)}
    if not tied:
        t["model.transformer.ff_out.weight"] = _t(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        t |= {p + "attn_norm.weight": 1 + _t(HIDDEN), p + "ff_norm.weight": 1 + _t(HIDDEN),
              p + "attn_out.weight": _t(HIDDEN, HIDDEN), p + "ff_out.weight": _t(HIDDEN, FFN)}
        if fused:
            t |= {p + "att_proj.weight": _t(HIDDEN + 2 * KV_HEADS * hd, HIDDEN),
                  p + "ff_proj.weight": _t(2 * FFN, HIDDEN)}
        else:
            t |= {p + "q_proj.weight": _t(HIDDEN, HIDDEN), p + "k_proj.weight": _t(KV_HEADS * hd, HIDDEN),
                  p + "v_proj.weight": _t(KV_HEADS * hd, HIDDEN), p + "ff_proj.weight": _t(FFN, HIDDEN),
                  p + "up_proj.weight": _t(FFN, HIDDEN)}
    return t


def qwen_reference(ids, t, *, head_dim, theta, eps, causal, qk_norm):
    layers = []
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        layer = {"attn_norm": t[p + "input_layernorm.weight"], "ff_norm": t[p + "post_attention_layernorm.weight"],
                 "o": t[p + "self_attn.o_proj.weight"], "gate": t[p + "mlp.gate_proj.weight"],
                 "up": t[p + "mlp.up_proj.weight"], "down": t[p + "mlp.down_proj.weight"]}
        for n in ("q", "k", "v"):
            layer[n] = t[p + f"self_attn.{n}_proj.weight"]
            layer[n + "_bias"] = t.get(p + f"self_attn.{n}_proj.bias")
        if qk_norm:
            layer |= {"q_norm": t[p + "self_attn.q_norm.weight"], "k_norm": t[p + "self_attn.k_norm.weight"]}
        layers.append(layer)
    return reference_logits(ids, embed=t["model.embed_tokens.weight"], layers=layers, norm=t["model.norm.weight"],
                            head=t["lm_head.weight"], heads=HEADS, kv_heads=KV_HEADS, head_dim=head_dim, theta=theta,
                            eps=eps, causal=causal)


def llada_reference(ids, t, *, fused=False, tied=False):
    hd = HIDDEN // HEADS
    layers = []
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        layer = {"attn_norm": t[p + "attn_norm.weight"], "ff_norm": t[p + "ff_norm.weight"],
                 "o": t[p + "attn_out.weight"], "down": t[p + "ff_out.weight"]}
        if fused:  # LLaDASequentialBlock
            layer |= {"att_proj": t[p + "att_proj.weight"], "fused_dims": (HIDDEN, KV_HEADS * hd, KV_HEADS * hd),
                      "ff_fused": t[p + "ff_proj.weight"]}
        else:  # LLaDALlamaBlock: act(ff_proj(x)) * up_proj(x) -> ff_out
            layer |= {"q": t[p + "q_proj.weight"], "k": t[p + "k_proj.weight"], "v": t[p + "v_proj.weight"],
                      "gate": t[p + "ff_proj.weight"], "up": t[p + "up_proj.weight"]}
        layers.append(layer)
    head = t["model.transformer.wte.weight"] if tied else t["model.transformer.ff_out.weight"]
    return reference_logits(ids, embed=t["model.transformer.wte.weight"], layers=layers,
                            norm=t["model.transformer.ln_f.weight"], head=head, heads=HEADS, kv_heads=KV_HEADS,
                            head_dim=hd, theta=500000.0, eps=1e-5, causal=False)


IDS = torch.tensor([[5, 17, 33, 2, 90, 64, 7, 11, 100, 3]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [None, "sdar", "trado", "idlm"])
def test_sdar_shaped_checkpoints_load_into_qwen3(tmp_path, family):
    from transformers import Qwen3ForCausalLM

    tensors = sdar_tensors()
    _write(tmp_path, SDAR_CONFIG, tensors)
    model, bd = load_as_hf(tmp_path, family=family)
    assert type(model) is Qwen3ForCausalLM
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    # head_dim 32 != hidden / heads: the config field must reach the model (q/k norm sizes would not even load).
    assert model.config.head_dim == 32 and model.config.rope_parameters["rope_theta"] == 1000000
    assert "flex" not in str(model.config._attn_implementation)  # the remote code's flex choice is dropped
    assert not hasattr(model.config, "fuse_cross_entropy") and not hasattr(model.config, "mask_token_id")
    torch.testing.assert_close(_logits(model), qwen_reference(IDS, tensors, head_dim=32, theta=1e6, eps=1e-6,
                                                              causal=True, qk_norm=True))
    if family == "idlm":  # strict causal attention, hidden i predicts token i + 1
        assert (bd.attention, bd.logit_shift) == ("causal", True)
    else:  # SDAR / TraDo: bidirectional inside a block, no shift
        assert (bd.attention, bd.logit_shift) == ("block", False)
    assert (bd.block_size, bd.mask_token_id) == (4, MASK)
    assert model.config.block_diffusion == bd.to_dict()


def test_dream_loads_into_bidirectional_qwen2(tmp_path):
    from transformers import Qwen2ForCausalLM

    tensors = dream_tensors()
    _write(tmp_path, DREAM_CONFIG, tensors)
    model, bd = load_as_hf(tmp_path)
    assert type(model) is Qwen2ForCausalLM and model.config.is_causal is False
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    expected = qwen_reference(IDS, tensors, head_dim=HIDDEN // HEADS, theta=1e6, eps=1e-6, causal=False,
                              qk_norm=False)
    torch.testing.assert_close(_logits(model), expected)
    assert (bd.attention, bd.logit_shift, bd.mask_token_id) == ("bidirectional", True, MASK)


@pytest.mark.parametrize("tied", [False, True])
def test_llada_key_map_into_bidirectional_llama(tmp_path, tied):
    from transformers import LlamaForCausalLM

    tensors = llada_tensors(tied=tied)
    _write(tmp_path, {**LLADA_CONFIG, "weight_tying": tied}, tensors)
    model, bd = load_as_hf(tmp_path)
    assert type(model) is LlamaForCausalLM and model.config.is_causal is False
    # Every LLaDA tensor sits at its Llama name (the table below is the remote code read by hand, not the key map).
    llama_of = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    state = model.state_dict()
    for i in range(LAYERS):
        for src, dst in llama_of.items():
            assert torch.equal(state[f"model.layers.{i}.{dst}.weight"],
                               tensors[f"model.transformer.blocks.{i}.{src}.weight"]), (i, src)
    assert torch.equal(state["model.embed_tokens.weight"], tensors["model.transformer.wte.weight"])
    head = tensors["model.transformer.wte.weight" if tied else "model.transformer.ff_out.weight"]
    assert torch.equal(model.lm_head.weight, head)
    torch.testing.assert_close(_logits(model), llada_reference(IDS, tensors, tied=tied))
    assert (bd.attention, bd.logit_shift, bd.mask_token_id, bd.block_size) == ("bidirectional", False, MASK, 32)


def test_llada_fused_sequential_block_is_split(tmp_path):
    tensors = llada_tensors(fused=True)
    _write(tmp_path, {**LLADA_CONFIG, "block_type": "sequential", "activation_type": "swiglu",
                      "mlp_hidden_size": 2 * FFN}, tensors)
    model, _ = load_as_hf(tmp_path)
    assert model.config.intermediate_size == FFN
    torch.testing.assert_close(_logits(model), llada_reference(IDS, tensors, fused=True))


def test_sharded_checkpoints(tmp_path):
    """Two safetensors shards + model.safetensors.index.json, for the key-mapped and the explicitly split LLaDA."""
    for fused in (False, True):
        tensors = llada_tensors(fused=fused)
        path = tmp_path / f"fused{fused}"
        extra = {"block_type": "sequential", "activation_type": "swiglu", "mlp_hidden_size": 2 * FFN} if fused else {}
        _write(path, {**LLADA_CONFIG, **extra}, {})
        (path / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(path / shard), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        model, _ = load_as_hf(path)
        torch.testing.assert_close(_logits(model), llada_reference(IDS, tensors, fused=fused))


def test_bidirectional_families_attend_forward(tmp_path):
    """A later token changes position 0's logits on LLaDA (bidirectional) and not on SDAR's plain forward."""
    _write(tmp_path / "llada", LLADA_CONFIG, llada_tensors())
    _write(tmp_path / "sdar", SDAR_CONFIG, sdar_tensors())
    other = IDS.clone()
    other[0, -1] = 4
    llada, _ = load_as_hf(tmp_path / "llada")
    sdar, _ = load_as_hf(tmp_path / "sdar")
    assert not torch.allclose(_logits(llada)[0, 0], _logits(llada, other)[0, 0])
    torch.testing.assert_close(_logits(sdar)[0, 0], _logits(sdar, other)[0, 0])


def test_overrides_and_dtype(tmp_path):
    _write(tmp_path, LLADA_CONFIG, llada_tensors())
    model, bd = load_as_hf(tmp_path, block_size=8, mask_token_id=126, dtype=torch.bfloat16)
    assert (bd.block_size, bd.mask_token_id) == (8, 126) and model.dtype == torch.bfloat16


def test_saved_model_reloads_natively(tmp_path):
    """save_pretrained writes Llama names (the LLaDA renames are forgotten) and a plain from_pretrained restores the
    model, its bidirectional attention and its BlockDiffusionConfig; load_as_hf reads it back as family "native"."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = llada_tensors()
    _write(tmp_path / "src", LLADA_CONFIG, tensors)
    model, bd = load_as_hf(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    native = ("model.layers.", "model.embed_tokens", "model.norm", "lm_head")
    assert all(k.startswith(native) for k in saved), sorted(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.config.is_causal is False and plain.config.block_diffusion == bd.to_dict()
    torch.testing.assert_close(_logits(plain), llada_reference(IDS, tensors))
    again, bd2 = load_as_hf(tmp_path / "out")
    assert bd2 == bd
    torch.testing.assert_close(_logits(again), _logits(plain))


# --------------------------------------------------------------------------------------------------------------------
# Detection and errors
# --------------------------------------------------------------------------------------------------------------------
def test_detect_family():
    assert detect_family(SDAR_CONFIG) == "sdar"
    assert detect_family(DREAM_CONFIG) == "dream"
    assert detect_family(LLADA_CONFIG) == "llada"
    assert detect_family({"model_type": "llama", "block_diffusion": {}}) == "native"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_family({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="Mixture-of-experts"):
        detect_family({"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"]})
    assert set(DLM_FAMILIES) >= {"sdar", "trado", "idlm", "dream", "llada"}


def test_unknown_family_and_remote_code_refused(tmp_path):
    _write(tmp_path, SDAR_CONFIG, sdar_tensors())
    with pytest.raises(ValueError, match="unknown diffusion-LM family"):
        load_as_hf(tmp_path, family="mdlm")
    with pytest.raises(ValueError, match="remote code"):
        load_as_hf(tmp_path, trust_remote_code=True)


@pytest.mark.parametrize("drop", ["hidden_size", "num_attention_heads"])
def test_missing_config_field(tmp_path, drop):
    _write(tmp_path, {k: v for k, v in SDAR_CONFIG.items() if k != drop}, sdar_tensors())
    with pytest.raises(ValueError, match=f"lacks required field.*{drop}"):
        load_as_hf(tmp_path)


def test_missing_mask_token(tmp_path):
    _write(tmp_path, {k: v for k, v in DREAM_CONFIG.items() if k != "mask_token_id"}, dream_tensors())
    with pytest.raises(ValueError, match="no mask_token_id"):
        load_as_hf(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_as_hf(tmp_path, mask_token_id=VOCAB)


def test_unknown_parameter_name_raises(tmp_path):
    tensors = llada_tensors()
    tensors["model.transformer.blocks.0.q_norm.weight"] = _t(HIDDEN)  # a name no mapping covers
    _write(tmp_path, LLADA_CONFIG, tensors)
    with pytest.raises(ValueError, match="does not match its config.*unexpected"):
        load_as_hf(tmp_path)


def test_missing_tensor_raises(tmp_path):
    tensors = llada_tensors()
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    _write(tmp_path, LLADA_CONFIG, tensors)
    with pytest.raises(ValueError, match="missing_keys.*layers.1.mlp.up_proj"):
        load_as_hf(tmp_path)


def test_shape_mismatch_raises(tmp_path):
    _write(tmp_path, {**SDAR_CONFIG, "intermediate_size": FFN + 32}, sdar_tensors())
    with pytest.raises((ValueError, RuntimeError), match="mismatch"):
        load_as_hf(tmp_path)
    bad_heads = {**LLADA_CONFIG, "n_heads": 5}
    with pytest.raises(ValueError, match="do not divide evenly"):
        dlm_native_config(bad_heads)


@pytest.mark.parametrize("switch", [{"input_emb_norm": True}, {"scale_logits": True}, {"alibi": True, "rope": False},
                                    {"include_qkv_bias": True}, {"attention_layer_norm": True},
                                    {"block_group_size": 2}, {"activation_type": "gelu"}])
def test_llada_switches_a_llama_cannot_compute(tmp_path, switch):
    with pytest.raises(ValueError, match="not loadable as a Llama"):
        dlm_native_config({**LLADA_CONFIG, **switch})


def test_key_mapping_covers_every_llada_name():
    import re

    names = set(llada_tensors())
    for name in names:
        assert sum(bool(re.search(p, name)) for p in LLADA_KEY_MAPPING) >= 1, name
