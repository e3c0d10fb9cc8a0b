"""LOSA's prefix-attention ops (Xi et al., "LoSA: Locality Aware Sparse Attention for Block-Wise Diffusion Language
Models", arXiv 2604.12056): QUEST-style page summaries and scores, the union of the pages the active block queries
select, and attention over that union with its log-sum-exp (joined with the in-block part by `lse_merge`).

Layout (batch 1, LOSA's scope): query (Hq, A, d), prefix key/value (Hkv, P, d), Hq = G * Hkv; query head h belongs
to KV head h // G (transformers' `repeat_kv` order). Page j covers keys j*page_size .. min((j+1)*page_size, P) - 1,
the last page may be partial. Keys are post-RoPE, as the model caches them (QUEST summarises rotated keys).

- `quest_page_summaries(key, page_size)` -> (kmin, kmax) (Hkv, n_pages, d): elementwise min / max over each page.
- `quest_page_scores(query, kmin, kmax)` -> (Hkv, A, n_pages): sum_d max(q_d kmin_d, q_d kmax_d), an upper bound of
  q.k for every key of the page, summed over the query heads of each KV head's group (so it bounds the group's
  summed q.k too).
- `select_union_pages(scores, pages_per_query, page_valid)` -> page_index (Hkv, M): per KV head, the union over the
  queries of each query's top `pages_per_query` pages, ascending, padded with -1.
- `union_sparse_prefix_attention(query, key, value, page_index, page_size, scale, key_valid)` -> (out (Hq, A, d),
  lse (Hq, A)): softmax attention of every query of a group over the keys of its KV head's pages (the loaded set),
  invalid keys (key_valid False, e.g. padding) excluded; lse is the natural-log log-sum-exp of scale * q.k over the
  keys used (-inf, and out 0, when there are none). Dispatched: the Triton twin (kernels/losa_triton.py) on CUDA.
- `prefix_attention_lse(query, key, value, scale, key_valid)`: the same over every prefix key, without a gather
  (LOSA's dense first step of a block).

All references compute in fp32 (fp64 for fp64 inputs); `out` has the query's dtype, `lse` is fp32 (fp64).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from .dispatch import kernel


# -- checks ---------------------------------------------------------------------------------------------------------
def check_losa_qkv(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None) -> None:
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"{name}: query must be (Hq, A, d) and key (Hkv, P, d); got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}.")
    if value is not None and value.shape != key.shape:
        raise ValueError(f"{name}: value {tuple(value.shape)} must have the key's shape {tuple(key.shape)}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{name}: query head dim {query.shape[-1]} != key head dim {key.shape[-1]}.")
    if key.shape[0] == 0 or query.shape[0] % key.shape[0]:
        raise ValueError(f"{name}: {query.shape[0]} query heads are not a multiple of {key.shape[0]} KV heads.")


def check_losa_page_size(name: str, page_size: int) -> None:
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"{name}: page_size must be a positive int; got {page_size!r}.")


# -- page summaries and scores --------------------------------------------------------------------------------------
def quest_page_summaries(key: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kmin, kmax), each (Hkv, ceil(P / page_size), d): elementwise min / max of each page's keys (same dtype)."""
    check_losa_page_size("quest_page_summaries", page_size)
    if key.dim() != 3:
        raise ValueError(f"quest_page_summaries: key must be (Hkv, P, d); got {tuple(key.shape)}.")
    hkv, length, dim = key.shape
    n_pages = -(-length // page_size)
    pad = n_pages * page_size - length
    if pad:
        # The pad rows repeat the page's last key: they change neither its min nor its max.
        key = torch.cat([key, key[:, -1:].expand(hkv, pad, dim)], dim=1)
    pages = key.reshape(hkv, n_pages, page_size, dim)
    return pages.amin(dim=2), pages.amax(dim=2)


def quest_page_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """(Hkv, A, n_pages): per page sum_d max(q_d kmin_d, q_d kmax_d), summed over each KV head's query group.

    fp32 (fp64 for fp64 inputs)."""
    check_losa_qkv("quest_page_scores", query, kmin)
    if kmin.shape != kmax.shape:
        raise ValueError(f"quest_page_scores: kmin {tuple(kmin.shape)} and kmax {tuple(kmax.shape)} differ.")
    hq, a, dim = query.shape
    hkv = kmin.shape[0]
    acc = torch.promote_types(query.dtype, torch.float32)
    q = query.to(acc).reshape(hkv, hq // hkv, a, dim)
    # max(q kmin, q kmax) = q+ kmax + q- kmin (q+ = max(q, 0), q- = min(q, 0)): two batched matmuls, no (.., d) blowup.
    pos, neg = q.clamp(min=0), q.clamp(max=0)
    scores = pos @ kmax.to(acc).unsqueeze(1).transpose(-1, -2) + neg @ kmin.to(acc).unsqueeze(1).transpose(-1, -2)
    return scores.sum(dim=1)


def select_union_pages(
    scores: torch.Tensor, pages_per_query: int, page_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """page_index (Hkv, M) long: per KV head the union of every query's top `pages_per_query` pages, ascending, -1 pad.

    scores (Hkv, A, n_pages); page_valid (n_pages,) bool: pages without any valid key are never selected.
    M is the largest union over the KV heads (0 when A == 0).
    """
    if scores.dim() != 3:
        raise ValueError(f"select_union_pages: scores must be (Hkv, A, n_pages); got {tuple(scores.shape)}.")
    if pages_per_query <= 0:
        raise ValueError(f"select_union_pages: pages_per_query must be positive; got {pages_per_query}.")
    hkv, a, n_pages = scores.shape
    if page_valid is not None:
        scores = scores.masked_fill(~page_valid.view(1, 1, n_pages), float("-inf"))
    k = min(pages_per_query, n_pages)
    chosen = torch.zeros(hkv, n_pages, dtype=torch.bool, device=scores.device)
    if a and k:
        top = scores.topk(k, dim=-1).indices  # (Hkv, A, k)
        chosen.scatter_(1, top.reshape(hkv, a * k), True)
    if page_valid is not None:
        chosen &= page_valid.view(1, n_pages)
    width = int(chosen.sum(dim=1).max().item()) if n_pages else 0
    positions = torch.arange(n_pages, device=scores.device).expand(hkv, n_pages)
    ordered = torch.where(chosen, positions, n_pages).sort(dim=1).values[:, :width]
    return torch.where(ordered < n_pages, ordered, -1)


# -- attention over (a subset of) the prefix ------------------------------------------------------------------------
def _grouped_attention_lse(query, key, value, valid, scale):
    """query (Hq, A, d), key/value (Hkv, N, d), valid (Hkv, N) bool or None -> (out (Hq, A, d), lse (Hq, A) fp32).

    GQA without repeating the keys: each KV head's G query heads are stacked into one (G*A, d) matrix.
    """
    hq, a, dim = query.shape
    hkv, n = key.shape[0], key.shape[1]
    acc = torch.promote_types(query.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    q = query.to(acc).reshape(hkv, (hq // hkv) * a, dim)
    logits = (q @ key.to(acc).transpose(-1, -2)) * scale  # (Hkv, G*A, N)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1) if n else logits.new_full(logits.shape[:-1], float("-inf"))
    finite = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.where(finite.unsqueeze(-1), probs @ value.to(acc), 0.0)
    return out.reshape(hq, a, dim).to(query.dtype), lse.reshape(hq, a)


def prefix_attention_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of query (Hq, A, d) over the whole prefix (Hkv, P, d): (out (Hq, A, d), lse (Hq, A) fp32)."""
    check_losa_qkv("prefix_attention_lse", query, key, value)
    valid = None if key_valid is None else key_valid.view(1, -1).expand(key.shape[0], -1)
    return _grouped_attention_lse(query, key, value, valid, scale)


def union_sparse_prefix_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_index: torch.Tensor,
    page_size: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query (Hq, A, d) over the keys of each KV head's selected pages: (out (Hq, A, d), lse (Hq, A)).

    page_index (Hkv, M) long, distinct page numbers per row (in any order) and -1 for unused slots; key_valid (P,)
    bool or None. See the module docstring.
    """
    check_losa_qkv("union_sparse_prefix_attention", query, key, value)
    check_losa_page_size("union_sparse_prefix_attention", page_size)
    hkv, length, dim = key.shape
    n_pages = -(-length // page_size)
    if page_index.dim() != 2 or page_index.shape[0] != hkv or page_index.dtype != torch.long:
        raise ValueError(f"union_sparse_prefix_attention: page_index must be ({hkv}, M) long; got "
                         f"{tuple(page_index.shape)} {page_index.dtype}.")
    if page_index.numel() and (page_index.min() < -1 or page_index.max() >= n_pages):
        raise ValueError(f"union_sparse_prefix_attention: page numbers must lie in [-1, {n_pages}).")
    if key_valid is not None and (key_valid.shape != (length,) or key_valid.dtype != torch.bool):
        raise ValueError(f"union_sparse_prefix_attention: key_valid must be ({length},) bool; got "
                         f"{tuple(key_valid.shape)} {key_valid.dtype}.")
    used = page_index >= 0
    ordered = torch.where(used, page_index, -1).sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("union_sparse_prefix_attention: a page appears twice in one row of page_index.")
    offsets = torch.arange(page_size, device=key.device)
    positions = page_index.clamp(min=0).unsqueeze(-1) * page_size + offsets  # (Hkv, M, page_size)
    valid = used.unsqueeze(-1) & (positions < length)
    positions = positions.clamp(max=max(length - 1, 0)).reshape(hkv, -1)
    valid = valid.reshape(hkv, -1)
    if key_valid is not None and length:
        valid &= key_valid[positions]
    index = positions.unsqueeze(-1).expand(hkv, positions.shape[1], dim)
    if length:
        k_sel, v_sel = key.gather(1, index), value.gather(1, index)
    else:  # no prefix at all: nothing to gather
        k_sel = v_sel = key.new_zeros(hkv, 0, dim)
        valid = valid[:, :0]
    return _grouped_attention_lse(query, k_sel, v_sel, valid, scale)


def _twin(path: str) -> str | None:
    # The Triton twin is written separately (kernels/losa_triton.py); until it exists every call takes the reference.
    module = path.partition(":")[0]
    try:
        return path if importlib.util.find_spec(module) is not None else None
    except (ImportError, ValueError):
        return None


union_sparse_prefix_attention = kernel(
    union_sparse_prefix_attention_reference,
    _twin("hf_fastslow.kernels.losa_triton:union_sparse_prefix_attention_triton"),
    name="union_sparse_prefix_attention",
)


def pages_for_budget(budget: int, page_size: int) -> int:
    """Pages one query may select for a per-query budget of `budget` tokens: ceil(budget / page_size)."""
    return math.ceil(budget / page_size)
