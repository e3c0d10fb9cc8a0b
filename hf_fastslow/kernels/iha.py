"""IHA's mix-attend-collapse: the PyTorch reference and the dispatcher to the fused Triton kernel.

Shapes: query [B, H, N, d], key/value [B, G, S, d] (post-RoPE, as the cache holds them), mask boolean
[B, 1, N, S] (True = attend) or None (bottom-right aligned token-causal), alpha_q [H, H, P] (m, h, p),
alpha_k/alpha_v [G, H, P], collapse [H, P] (per-head) or [H, H, P] (global: out head, source head, p).
Output [B, N, H, d] (what HF's attention functions return).

Pseudo-token (n, p) sits at index n*P + p of a P-times longer sequence and may see every pseudo-token of every key
token its base token may see (token-causal), so each key's P copies share one mask entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import kernel


def token_causal_mask(batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask [B, 1, N, S]: query n (the last N of S positions) sees keys <= S - N + n."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= q_pos).expand(batch, 1, q_len, kv_len)


def check_iha_shapes(query, key, value, mask, alpha_q, alpha_k, alpha_v, collapse) -> int:
    """Validate shapes; return P."""
    b, h, n, d = query.shape
    g, s = key.shape[1], key.shape[2]
    p = alpha_q.shape[-1]
    if key.shape != (b, g, s, d) or value.shape != key.shape:
        raise ValueError(
            f"IHA: key {tuple(key.shape)} / value {tuple(value.shape)} do not fit query {tuple(query.shape)}."
        )
    if alpha_q.shape != (h, h, p) or alpha_k.shape != (g, h, p) or alpha_v.shape != (g, h, p):
        raise ValueError(
            f"IHA: mixing shapes q {tuple(alpha_q.shape)}, k {tuple(alpha_k.shape)}, v {tuple(alpha_v.shape)} "
            f"do not fit H={h}, G={g}, P={p}."
        )
    if collapse.shape not in ((h, p), (h, h, p)):
        raise ValueError(
            f"IHA: collapse {tuple(collapse.shape)} is neither per-head ({h}, {p}) nor global ({h}, {h}, {p})."
        )
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
                             or mask.shape[2:] != (n, s) or mask.shape[0] not in (1, b)):
        raise ValueError(f"IHA: mask must be boolean [B, 1, {n}, {s}]; got {mask.dtype} {tuple(mask.shape)}.")
    return p


def iha_attend_reference(query, key, value, mask, alpha_q, alpha_k, alpha_v, collapse, scaling, dropout=0.0):
    """Mix, interleave, attend (SDPA), collapse. Differentiable in every argument; the training path."""
    p = check_iha_shapes(query, key, value, mask, alpha_q, alpha_k, alpha_v, collapse)
    b, _, n, _ = query.shape
    s = key.shape[2]
    dtype = query.dtype
    q_mix = torch.einsum("mhp,bmnd->bhnpd", alpha_q.to(dtype), query).flatten(2, 3)  # [B, H, N*P, d]
    k_mix = torch.einsum("ghp,bgsd->bhspd", alpha_k.to(dtype), key).flatten(2, 3)  # [B, H, S*P, d]
    v_mix = torch.einsum("ghp,bgsd->bhspd", alpha_v.to(dtype), value).flatten(2, 3)
    if mask is None:
        mask = token_causal_mask(b, n, s, query.device)
    # A query row with no visible key (a left-padding position) would give NaN; SDPA then gets one visible key and
    # the row is zeroed below, so padding never feeds NaN into later layers.
    empty_rows = ~mask.any(-1, keepdim=True)  # [B, 1, N, 1]
    safe = mask | (empty_rows & (torch.arange(s, device=mask.device) == 0))
    pseudo_mask = safe.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)  # [B, 1, N*P, S*P]
    out = F.scaled_dot_product_attention(q_mix, k_mix, v_mix, attn_mask=pseudo_mask, dropout_p=dropout, scale=scaling)
    out = out.unflatten(2, (n, p))  # [B, H, N, P, d]
    out = out.masked_fill(empty_rows.unsqueeze(-1), 0.0)
    c = collapse.to(dtype)
    if c.dim() == 2:
        return torch.einsum("hp,bhnpd->bnhd", c, out)
    return torch.einsum("hjp,bjnpd->bnhd", c, out)


iha_attend = kernel(iha_attend_reference, "hf_fastslow.kernels.iha_triton:iha_attend_triton", name="iha_attend")
