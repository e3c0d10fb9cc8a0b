"""CARE: GQA -> latent (MLA-style) K/V conversion of a pretrained model (Zhou et al., ICLR 2026, arXiv 2603.17946).

Per layer, the K and V projections W (x -> x W, W: D x gd) become W_down (D x r) and W_up (r x gd) chosen to minimise
the error on real activations: with C = E[x x^T] from calibration text and S = sqrt(C + damping), the SVD
S W = U Sigma V^T gives W_down = S^-1 U_r Sigma_r and W_up = V_r^T, so that E||x (W - W_down W_up)||^2 = sum_{i>r}
sigma_i^2 is the smallest any rank-r factorisation reaches. q/k/v biases (Qwen2) are folded in as an extra constant-1
input column, so the bias lives in W_down. Per-layer ranks come from `care_config.allocate_ranks`; at r = gd
(the KV width, "KV parity") the converted model equals the original. The converted model caches only the latents
(`care_attention`): bytes per token scale with sum_l (r_k,l + r_v,l) instead of 2 L gd.

    moments = collect_kv_second_moments(model, calibration_batches)
    model = convert_gqa_to_mla(model, moments, CAREConfig(rank=96))
    model.save_pretrained(path); model = from_pretrained_care(path)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation.memory import storage_bytes
from ..integrations import attention_modules, cache_kwargs
from .care_attention import check_supported, install_latent_attention, latent_widths
from .care_config import CAREConfig, allocate_ranks, clamp_rank

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
    "whitened_factors",
    "whitening_matrices",
]


@dataclass
class KVMoments:
    """Uncentred second moments of each layer's K/V projection input, augmented with a constant-1 column:
    `second[l]` is E[[x, 1]^T [x, 1]] ((D+1) x (D+1), fp64) over `n_tokens` calibration tokens."""

    second: list[torch.Tensor]
    n_tokens: int


def kv_width(model: nn.Module) -> int:
    """Width of one layer's K (and of its V) projection: num_key_value_heads * head_dim."""
    attn = attention_modules(model)[0]
    proj = getattr(attn, "k_proj", None) or attn.k_up
    return proj.out_features


@torch.no_grad()
def collect_kv_second_moments(model: nn.Module, batches: Sequence[torch.Tensor]) -> KVMoments:
    """Run the (unconverted) model on `batches` (a list of `input_ids` tensors, [B, T] or [T]) and return each layer's
    second moment of the K/V projection input. Every token of every batch counts (pass unpadded batches)."""
    if batches is None or len(batches) == 0:
        raise ValueError("collect_kv_second_moments: no calibration batches (pass a non-empty list of input_ids).")
    for i, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
            raise TypeError(f"collect_kv_second_moments: batch {i} is not an integer input_ids tensor.")
        if ids.numel() == 0:
            raise ValueError(f"collect_kv_second_moments: batch {i} is empty.")
    attns = check_supported(model)
    hidden = attns[0].k_proj.in_features
    sums = [torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64) for _ in attns]
    count = [0]

    def hook(layer):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, hidden).to("cpu", torch.float64)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            sums[layer].addmm_(x.T, x)

        return accumulate

    handles = [attn.k_proj.register_forward_pre_hook(hook(i)) for i, attn in enumerate(attns)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in batches:
            ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
            model(ids.to(device), use_cache=False)
            count[0] += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return KVMoments(second=[s / count[0] for s in sums], n_tokens=count[0])


def whitening_matrices(moment: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S = sqrt(C + damping * mean(diag C) * I), symmetric, fp64."""
    c = moment + damping * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)
    eigvals, eigvecs = torch.linalg.eigh(c)
    eigvals = eigvals.clamp_min(eigvals.max() * 1e-12)
    root = eigvals.sqrt()
    return (eigvecs * root) @ eigvecs.T, (eigvecs / root) @ eigvecs.T


def whitened_factors(whitening: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor):
    """Full-rank CARE factors of `weight` (D x gd, x -> x W) under `whitening = (S, S^-1)`: (down D x k, sigma (k,),
    up k x gd), k = min(D, gd), with down[:, :r] @ up[:r] the rank-r minimiser of ||S (W - W_r)||_F (its error is
    sum_{i>r} sigma_i^2)."""
    root, inv_root = whitening
    u, s, vh = torch.linalg.svd(root @ weight, full_matrices=False)
    return inv_root @ u * s, s, vh


def _check_moments(moments: KVMoments, attns: list[nn.Module]) -> None:
    if not isinstance(moments, KVMoments):
        raise TypeError("convert_gqa_to_mla: `moments` must come from collect_kv_second_moments.")
    if len(moments.second) != len(attns):
        raise ValueError(f"convert_gqa_to_mla: moments for {len(moments.second)} layers, the model has {len(attns)}.")
    hidden = attns[0].k_proj.in_features
    for i, m in enumerate(moments.second):
        if m is None or tuple(m.shape) != (hidden + 1, hidden + 1):
            raise ValueError(f"convert_gqa_to_mla: moments of layer {i} missing or not ({hidden + 1}, {hidden + 1}).")
        if not torch.isfinite(m).all():
            raise ValueError(f"convert_gqa_to_mla: moments of layer {i} are not finite.")


def _augmented_weight(proj: nn.Linear) -> torch.Tensor:
    """[W^T; b] ((D+1) x gd, fp64) when the projection has a bias, W^T (D x gd) otherwise."""
    weight = proj.weight.detach().to("cpu", torch.float64).T
    if proj.bias is None:
        return weight
    return torch.cat([weight, proj.bias.detach().to("cpu", torch.float64).unsqueeze(0)], dim=0)


def convert_gqa_to_mla(model: nn.Module, moments: KVMoments, config: CAREConfig) -> nn.Module:
    """Replace every layer's K/V projections by CARE latent factors (in place; returns `model`).

    Everything is checked and factorised before the model is touched: an unsupported architecture, bad moments, a
    rank below 1 or a budget the allocation bounds cannot meet raise and leave the model as it was.
    """
    if not isinstance(config, CAREConfig):
        raise TypeError("convert_gqa_to_mla: `config` must be a CAREConfig.")
    attns = check_supported(model)
    _check_moments(moments, attns)
    width = min(attns[0].k_proj.out_features, attns[0].k_proj.in_features + 1)
    rank = clamp_rank(config.rank, width)
    factors = {"k": [], "v": []}
    for attn, moment in zip(attns, moments.second):
        has_bias = attn.k_proj.bias is not None
        sized = moment if has_bias else moment[:-1, :-1]
        whitening = whitening_matrices(sized, config.damping)
        for prefix in ("k", "v"):
            factors[prefix].append(whitened_factors(whitening, _augmented_weight(getattr(attn, f"{prefix}_proj"))))
    ranks = {}
    for prefix in ("k", "v"):
        ranks[prefix] = allocate_ranks([f[1] for f in factors[prefix]], rank, config.allocation, config.rank_min,
                                       config.rank_max)
    for layer, attn in enumerate(attns):
        ref = attn.k_proj.weight
        installed = []
        for prefix in ("k", "v"):
            down, _, vh = factors[prefix][layer]
            r = ranks[prefix][layer]
            down = down[:, :r].T.to(ref.device, ref.dtype)  # [r, D(+1)]
            bias = down[:, -1] if attn.k_proj.bias is not None else None
            down = down[:, :-1] if bias is not None else down
            installed.append((down.contiguous(), bias, vh[:r].T.to(ref.device, ref.dtype).contiguous(), None))
        install_latent_attention(model, attn, installed[0], installed[1])
    model.config.care = {"method": "care", "k_ranks": ranks["k"], "v_ranks": ranks["v"], "kv_width": width,
                         "rope": "rebuild", **config.to_dict()}
    return model


def svd_baseline(model: nn.Module, rank: int) -> nn.Module:
    """Peer baseline (Palu-style plain SVD, no whitening): each layer's K and V weight truncated to `rank` singular
    values (the latent width per layer for K and for V), same latent cache as CARE; biases stay on the up-projection.
    In place; returns `model`."""
    attns = check_supported(model)
    width = attns[0].k_proj.out_features
    rank = clamp_rank(rank, min(width, attns[0].k_proj.in_features))
    for attn in attns:
        ref = attn.k_proj.weight
        installed = []
        for prefix in ("k", "v"):
            proj = getattr(attn, f"{prefix}_proj")
            u, s, vh = torch.linalg.svd(proj.weight.detach().to("cpu", torch.float64).T, full_matrices=False)
            down = (u[:, :rank] * s[:rank]).T.to(ref.device, ref.dtype).contiguous()
            up = vh[:rank].T.to(ref.device, ref.dtype).contiguous()
            bias = None if proj.bias is None else proj.bias.detach().clone()
            installed.append((down, None, up, bias))
        install_latent_attention(model, attn, installed[0], installed[1])
    model.config.care = {"method": "svd", "k_ranks": [rank] * len(attns), "v_ranks": [rank] * len(attns),
                         "kv_width": width, "rope": "rebuild", "rank": rank}
    return model


@torch.no_grad()
def care_kv_bytes_per_token(model: nn.Module, lengths: Sequence[int] = (16, 32, 48, 64)) -> dict:
    """KV cache bytes per token, measured: a DynamicCache is filled token block by token block with random ids and
    walked (`storage_bytes`) after each block; bytes per token is the least-squares slope, `fixed` the intercept.
    Works on converted and unconverted models alike (the same rule for both)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, max(lengths)), generator=generator)
    cache = DynamicCache(config=model.config)
    points, fed = [], 0
    for length in sorted(lengths):
        model(ids[:, fed:length].to(device), use_cache=True, **cache_kwargs(model, cache))
        fed = length
        points.append((length, storage_bytes(cache)))
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return {"bytes_per_token": slope, "fixed": my - slope * mx, "points": points}


def _load_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _zero_factors(rank: int, hidden: int, width: int, down_bias: bool, up_bias: bool, dtype: torch.dtype) -> tuple:
    return (torch.zeros(rank, hidden, dtype=dtype), torch.zeros(rank, dtype=dtype) if down_bias else None,
            torch.zeros(width, rank, dtype=dtype), torch.zeros(width, dtype=dtype) if up_bias else None)


def from_pretrained_care(path: str | os.PathLike, dtype: torch.dtype | None = None, **config_kwargs) -> nn.Module:
    """Reload a converted model saved with `save_pretrained` (no `trust_remote_code`): the stock architecture is built
    from `config.json`, its attention modules are converted to the saved latent widths, then the weights are loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    care = getattr(config, "care", None)
    if not isinstance(care, dict) or "k_ranks" not in care:
        raise ValueError(f"{path}: config.json has no `care` entry; not a CARE-converted checkpoint.")
    dtype = dtype if dtype is not None else getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    attns = check_supported(model)
    if len(care["k_ranks"]) != len(attns):
        raise ValueError(f"{path}: `care` lists {len(care['k_ranks'])} layers, the model has {len(attns)}.")
    for attn, r_k, r_v in zip(attns, care["k_ranks"], care["v_ranks"]):
        hidden, width = attn.k_proj.in_features, attn.k_proj.out_features
        down_bias = care.get("method") == "care" and attn.k_proj.bias is not None
        up_bias = care.get("method") == "svd" and attn.k_proj.bias is not None

        shapes = [_zero_factors(r, hidden, width, down_bias, up_bias, dtype) for r in (r_k, r_v)]
        install_latent_attention(model, attn, shapes[0], shapes[1])
    state = _load_safetensors_dir(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        model.tie_weights()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: weights do not match the CARE structure (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}).")
    if os.path.exists(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
