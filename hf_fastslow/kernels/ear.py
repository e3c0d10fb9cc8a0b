"""SVG-EAR attention (Zhou et al., arXiv 2603.08982): k-means block-sparse attention in which every skipped block is
replaced by its key/value centroids, and the blocks computed exactly are chosen by a probe of compensation error per
unit cost. The SVG2-style peer (score routing, skipped blocks dropped) and score routing with compensation are the
same function with `router="score"` and `compensate=False/True`.

Layout as `torch.nn.functional.scaled_dot_product_attention`: q (B, Hq, Nq, D), k and v (B, Hk, Nk, D) with
Hq a multiple of Hk (GQA). Per (batch, KV head):
1. k-means on the keys (C_k clusters) and on the queries of the KV group, clustered jointly as (Nq, G*D) vectors,
   so that the G query heads of a group share one block map (and one K/V load per block);
2. the probe (`ear_probe`): for query centroid i and key cluster j, err_ij = ||E_ij - C_ij||^2 / Z_i^2 with
   E_ij = sum_{u in K_j} exp(s q_i.k_u) v_u, C_ij = n_j exp(s q_i.k_j) v_j (centroids), Z_i = sum_u exp(s q_i.k_u),
   summed over the group's heads;
3. routing (`route_blocks`): blocks (i, j) of cost |Q_i| n_j taken greedily by priority err_ij / n_j ("error to
   size"), as the longest prefix of that order whose cost fits the budget density * Nq * Nk; the score router
   ranks by the centroid-estimated block mass per unit cost instead;
4. `block_sparse_attention`: exact attention on the chosen blocks plus, for every other non-empty key cluster,
   n_j exp(s q.k_j) v_j in the same softmax (or nothing, `compensate=False`), over the permuted tokens.

Causal mode (`causal=True`, LLM prefill; query t sits at key position Nk - Nq + t): keys are cut into chunks of
`causal_chunk` tokens. A query of chunk a attends exactly to chunk 0 (the attention sinks) and to its own chunk under
the causal mask; the fully visible chunks 1..a-1 are clustered chunk by chunk and routed + compensated. So that no
token ever changes an earlier output, the query clusters of chunk a are the k-means centroids of chunk a-1's queries
(each query of chunk a is assigned to its nearest one), and the budget is per query cluster: every cluster gets
density * (routed keys) keys. Where chunk a-1's queries are not part of the call (a prefill continuing a cache), the
routed part of chunk a is computed exactly. The exact and routed parts are joined with `lse_merge`.

`density` is the fraction of routed (query, key) pairs computed exactly; the dense diagonal and sink chunk of the
causal mode come on top. Cluster counts larger than the tokens are capped at the token count (not an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dispatch import kernel
from .kmeans import kmeans, kmeans_assign, kmeans_update
from .lse_merge import lse_merge

ROUTERS = ("error", "score")


@dataclass
class EARState:
    """Centroids kept between calls to warm-start k-means (a DiT's denoising steps); non-causal use only."""

    q_centroids: torch.Tensor | None = None  # (B, Hk, Cq, G*D)
    k_centroids: torch.Tensor | None = None  # (B, Hk, Ck, D)
    calls: int = 0


@dataclass
class EARInfo:
    lse: torch.Tensor  # (B, Hq, Nq) log-sum-exp of the scaled logits the output was computed with
    density: float  # routed (query, key) pairs computed exactly / routed pairs (1.0 when nothing is routed)
    exact_pairs: int  # per KV head and batch row, summed
    routed_pairs: int
    block_mask: torch.Tensor | None = None  # non-causal: (B, Hk, Cq, Ck) blocks computed exactly
    block_cost: torch.Tensor | None = None  # non-causal: (B, Hk, Cq, Ck) |Q_i| * n_j (int64)
    probe_error: torch.Tensor | None = None  # non-causal: (B, Hk, Cq, Ck) |Q_i| * err_ij, summed over the group


# -- checks -------------------------------------------------------------------------------------------------------
def check_ear_args(q, k, v, density, num_q_clusters, num_k_clusters, router, causal, causal_chunk, kmeans_iters):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"ear_attention: {name} must be a (B, H, N, D) tensor; got {getattr(t, 'shape', t)}.")
        if not t.is_floating_point():
            raise TypeError(f"ear_attention: {name} must be floating point; got {t.dtype}.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"ear_attention: query head dim {q.shape[-1]} != key head dim {k.shape[-1]}.")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"ear_attention: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in (B, H, N).")
    if v.shape[-1] != k.shape[-1]:
        raise ValueError(f"ear_attention: value head dim {v.shape[-1]} != key head dim {k.shape[-1]} (unsupported).")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"ear_attention: batch {q.shape[0]} (q) != {k.shape[0]} (k).")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"ear_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads.")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("ear_attention: empty query or key sequence.")
    if not (isinstance(density, (int, float)) and 0.0 <= float(density) <= 1.0 and math.isfinite(float(density))):
        raise ValueError(f"ear_attention: density must be in [0, 1]; got {density!r}.")
    for name, c in (("num_q_clusters", num_q_clusters), ("num_k_clusters", num_k_clusters)):
        if not isinstance(c, int) or c < 1:
            raise ValueError(
                f"ear_attention: {name} must be an int >= 1; got {c!r} (counts above the tokens are capped)."
            )
    if router not in ROUTERS:
        raise ValueError(f"ear_attention: router must be one of {ROUTERS}; got {router!r}.")
    if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ValueError(f"ear_attention: kmeans_iters must be an int >= 0; got {kmeans_iters!r}.")
    if causal:
        if not isinstance(causal_chunk, int) or causal_chunk < 1:
            raise ValueError(f"ear_attention: causal_chunk must be an int >= 1; got {causal_chunk!r}.")
        if q.shape[2] > k.shape[2]:
            raise ValueError(
                f"ear_attention: causal mode needs Nq <= Nk (queries are the last Nq key positions); "
                f"got Nq={q.shape[2]}, Nk={k.shape[2]}."
            )


# -- small shared pieces --------------------------------------------------------------------------------------------
def _offsets(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(…, C + 1) start of each cluster in the label-sorted order."""
    counts = torch.zeros(*labels.shape[:-1], num_clusters, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(-1, labels, torch.ones_like(labels))
    return torch.cat([torch.zeros_like(counts[..., :1]), counts.cumsum(-1)], dim=-1)


def _labels_from_offsets(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_offsets` for sorted tokens: the cluster of each of the n sorted positions."""
    pos = torch.arange(n, device=offsets.device).expand(*offsets.shape[:-1], n).contiguous()
    return torch.searchsorted(offsets[..., 1:].contiguous(), pos, right=True)


def _group_heads(x: torch.Tensor, num_kv: int) -> torch.Tensor:
    """(B, Hk*G, ...) -> (B, Hk, G, ...)."""
    return x.unflatten(1, (num_kv, -1))


def _per_query_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hk, ...) -> (B, Hk*G, ...), each KV head's tensor repeated for its query heads."""
    return x.repeat_interleave(group, dim=1)


def dense_attention_lse(q, k, v, mask, scale):
    """Exact attention with its log-sum-exp; `mask` (…, Nq, Nk) True = attend; rows with no key give 0 and -inf.

    q (B, Hq, Nq, D), k/v (B, Hk, Nk, D); fp32 result.
    """
    group = q.shape[1] // k.shape[1]
    kf, vf = _per_query_head(k.float(), group), _per_query_head(v.float(), group)
    logits = (q.float() @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = probs @ vf
    return torch.where(finite.unsqueeze(-1), out, 0.0), lse


# -- the probe ------------------------------------------------------------------------------------------------------
def ear_probe_reference(q_centroids, k_perm, v_perm, k_offsets, k_centroids, v_means, scale):
    """err_ij = ||E_ij - C_ij||^2 / Z_i^2 per query head: (B, Hq, Cq, Ck) float32 (see the module docstring).

    q_centroids (B, Hq, Cq, D); k_perm/v_perm (B, Hk, Nk, D) sorted by key cluster, k_offsets (B, Hk, Ck + 1);
    k_centroids/v_means (B, Hk, Ck, D).
    """
    bsz, hq, cq, dim = q_centroids.shape
    hk, nk, ck = k_perm.shape[1], k_perm.shape[2], k_centroids.shape[2]
    group = hq // hk
    labels = _labels_from_offsets(k_offsets, nk)  # (B, Hk, Nk)
    counts = (k_offsets[..., 1:] - k_offsets[..., :-1]).float()
    err = torch.empty(bsz, hq, cq, ck, dtype=torch.float32, device=q_centroids.device)
    for b in range(bsz):
        for h in range(hq):  # one head at a time keeps the (Cq, Nk, D) intermediate small
            g = h // group
            qc, kk, vv = q_centroids[b, h].float(), k_perm[b, g].float(), v_perm[b, g].float()
            logits = (qc @ kk.T) * scale  # (Cq, Nk)
            m = logits.amax(-1, keepdim=True)
            p = torch.exp(logits - m)
            z = p.sum(-1)  # (Cq,)
            exact = torch.zeros(cq, ck, dim, dtype=torch.float32, device=qc.device)
            exact.index_add_(1, labels[b, g], p.unsqueeze(-1) * vv.unsqueeze(0))
            approx_w = counts[b, g] * torch.exp((qc @ k_centroids[b, g].float().T) * scale - m)  # (Cq, Ck)
            approx = approx_w.unsqueeze(-1) * v_means[b, g].float().unsqueeze(0)
            err[b, h] = ((exact - approx) ** 2).sum(-1) / (z * z).unsqueeze(-1)
    return err


ear_probe = kernel(ear_probe_reference, "hf_fastslow.kernels.ear_triton:ear_probe_triton", name="ear_probe")


# -- block-sparse attention with centroid compensation --------------------------------------------------------------
def block_sparse_attention_reference(
    q_perm, k_perm, v_perm, q_offsets, k_offsets, block_mask, k_centroids, v_means, scale, compensate
):
    """Exact attention over the blocks of `block_mask` + centroid terms for the others, in one softmax.

    q_perm (B, Hq, Nq, D) sorted by query cluster (shared by a KV group), q_offsets (B, Hk, Cq + 1); k_perm/v_perm
    (B, Hk, Nk, D) sorted by key cluster, k_offsets (B, Hk, Ck + 1); block_mask (B, Hk, Cq, Ck) bool; centroids and
    value means (B, Hk, Ck, D). Returns (out (B, Hq, Nq, D) fp32, lse (B, Hq, Nq)) in the permuted order.
    """
    bsz, hq, nq, dim = q_perm.shape
    hk, nk = k_perm.shape[1], k_perm.shape[2]
    group = hq // hk
    q_labels = _labels_from_offsets(q_offsets, nq)
    k_labels = _labels_from_offsets(k_offsets, nk)
    counts = k_offsets[..., 1:] - k_offsets[..., :-1]
    out = torch.empty(bsz, hq, nq, dim, dtype=torch.float32, device=q_perm.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q_perm.device)
    for b in range(bsz):
        for h in range(hq):
            g = h // group
            qq = q_perm[b, h].float()
            rows = block_mask[b, g][q_labels[b, g]]  # (Nq, Ck): the blocks of each query's cluster
            exact = torch.gather(rows, 1, k_labels[b, g].unsqueeze(0).expand(nq, nk))  # (Nq, Nk)
            logits = (qq @ k_perm[b, g].float().T) * scale
            logits = logits.masked_fill(~exact, float("-inf"))
            values = v_perm[b, g].float()
            if compensate:
                comp = (qq @ k_centroids[b, g].float().T) * scale + torch.log(counts[b, g].float())
                comp = comp.masked_fill(rows | (counts[b, g] == 0), float("-inf"))
                logits = torch.cat([logits, comp], dim=-1)
                values = torch.cat([values, v_means[b, g].float()], dim=0)
            row_lse = torch.logsumexp(logits, dim=-1)
            finite = torch.isfinite(row_lse)
            probs = torch.exp(logits - torch.where(finite, row_lse, torch.zeros_like(row_lse)).unsqueeze(-1))
            out[b, h] = torch.where(finite.unsqueeze(-1), probs @ values, 0.0)
            lse[b, h] = row_lse
    return out, lse


block_sparse_attention = kernel(
    block_sparse_attention_reference,
    "hf_fastslow.kernels.ear_triton:block_sparse_attention_triton",
    name="block_sparse_attention",
)


# -- routing --------------------------------------------------------------------------------------------------------
def route_blocks(
    priority: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, *, per_row: bool = False,
    keep_top_per_row: bool = False,
) -> torch.Tensor:
    """Blocks to compute exactly: the longest prefix of the descending-`priority` order whose cost fits `budget`.

    priority (…, Cq, Ck) float (-inf = never), cost (…, Cq, Ck) int64; budget (…) int64 for the whole map, or
    (…, Cq) per query cluster with `per_row`. A prefix of one fixed order makes the selection nested (monotone) in the
    budget. `keep_top_per_row` first takes each row's best block whatever the budget (so that, when skipped blocks are
    dropped, no query is left without keys): the cost may then exceed the budget by at most one block per row.
    """
    valid = torch.isfinite(priority) | (priority == float("inf"))
    prio = priority.float()
    if keep_top_per_row:
        top = torch.where(valid, prio, float("-inf")).argmax(-1, keepdim=True)
        forced = torch.zeros_like(valid).scatter_(-1, top, True) & valid
        prio = torch.where(forced, float("inf"), prio)
    flat_prio = prio if per_row else prio.flatten(-2)
    flat_cost = cost if per_row else cost.flatten(-2)
    order = torch.argsort(flat_prio, dim=-1, descending=True, stable=True)
    spent = torch.gather(flat_cost, -1, order).cumsum(-1)
    limit = budget.unsqueeze(-1)
    if keep_top_per_row:
        forced_cost = (torch.where(forced, cost, 0)).sum(-1) if per_row else torch.where(forced, cost, 0).sum((-2, -1))
        limit = torch.maximum(limit, forced_cost.unsqueeze(-1))
    taken_sorted = spent <= limit
    taken = torch.zeros_like(taken_sorted).scatter_(-1, order, taken_sorted)
    if not per_row:
        taken = taken.unflatten(-1, priority.shape[-2:])
    return taken & valid


def _priorities(router, q_cent, k_cent, counts, err_sum, scale, group):
    """(B, Hk, Cq, Ck) priority per unit cost |Q_i| n_j; -inf for empty key clusters."""
    n = counts.float()
    if router == "error":
        prio = err_sum / n.unsqueeze(-2).clamp(min=1)
    else:
        # Size-weighted softmax of the centroid logits: the estimated share of query cluster i's attention that
        # falls in key cluster j, summed over the group's heads, per key.
        logits = (q_cent.float() @ _per_query_head(k_cent.float(), group).transpose(-1, -2)) * scale
        logits = logits + torch.log(_per_query_head(n, group)).unsqueeze(-2)
        mass = torch.softmax(logits, dim=-1)
        prio = _group_heads(mass, counts.shape[1]).sum(2) / n.unsqueeze(-2).clamp(min=1)
    return torch.where((counts > 0).unsqueeze(-2), prio, float("-inf"))


# -- clustering -----------------------------------------------------------------------------------------------------
def _group_query_points(q: torch.Tensor, num_kv: int) -> torch.Tensor:
    """(B, Hq, N, D) -> (B, Hk, N, G*D): a token's queries of all heads of a KV group, one point per token."""
    return _group_heads(q, num_kv).permute(0, 1, 3, 2, 4).flatten(-2)


def _split_query_centroids(cent: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, Hk, C, G*D) -> (B, Hq, C, D)."""
    return cent.unflatten(-1, (-1, dim)).permute(0, 1, 3, 2, 4).flatten(1, 2)


def _cluster(points, num_clusters, iters, seed, init=None):
    """k-means labels and the exact means of the final clusters (empty clusters keep their centroid)."""
    if init is not None and (init.shape[:-2] != points.shape[:-2] or init.shape[-1] != points.shape[-1]
                             or init.shape[-2] != min(num_clusters, points.shape[-2])):
        init = None
    result = kmeans(points, num_clusters, iters=iters, init=init, seed=seed)
    means, _ = kmeans_update(points, result.labels, result.centroids)
    return result.labels, means


# -- the routed core ------------------------------------------------------------------------------------------------
def _routed_attention(q, k, v, q_labels, q_cent_grouped, k_labels, k_cent, v_means, *, density, router,
                      compensate, scale, per_row, want_probe):
    """EAR over given clusterings. q (B, Hq, Nq, D), q_labels (B, Hk, Nq), q_cent_grouped (B, Hk, Cq, G*D);
    k/v (B, Hk, Nk, D), k_labels (B, Hk, Nk), k_cent/v_means (B, Hk, Ck, D). Returns (out, lse, mask, cost, probe)."""
    bsz, hq, nq, dim = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = hq // hk
    cq, ck = q_cent_grouped.shape[-2], k_cent.shape[-2]
    q_order = torch.argsort(q_labels, dim=-1, stable=True)
    k_order = torch.argsort(k_labels, dim=-1, stable=True)
    q_order_h = _per_query_head(q_order, group)
    q_perm = torch.gather(q, 2, q_order_h.unsqueeze(-1).expand(-1, -1, -1, dim))
    k_perm = torch.gather(k, 2, k_order.unsqueeze(-1).expand(-1, -1, -1, dim))
    v_perm = torch.gather(v, 2, k_order.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
    q_off, k_off = _offsets(q_labels, cq), _offsets(k_labels, ck)
    q_counts, k_counts = q_off[..., 1:] - q_off[..., :-1], k_off[..., 1:] - k_off[..., :-1]
    q_cent = _split_query_centroids(q_cent_grouped, dim)
    cost = q_counts.unsqueeze(-1) * k_counts.unsqueeze(-2)  # (B, Hk, Cq, Ck) int64
    err_sum = None
    if router == "error" or want_probe:
        err = ear_probe(q_cent.contiguous(), k_perm.contiguous(), v_perm.contiguous(), k_off, k_cent.contiguous(),
                        v_means.contiguous(), scale)
        err_sum = _group_heads(err, hk).sum(2)
    prio = _priorities(router, q_cent, k_cent, k_counts, err_sum, scale, group)
    if per_row:
        budget = q_counts * int(math.floor(density * nk + 1e-9))
    else:
        budget = torch.full((bsz, hk), int(math.floor(density * nq * nk + 1e-9)), dtype=torch.int64, device=q.device)
    mask = route_blocks(prio, cost, budget, per_row=per_row, keep_top_per_row=not compensate)
    mask |= (cost > 0) & (density >= 1.0)  # density 1: every block, whatever the rounding
    out_p, lse_p = block_sparse_attention(q_perm.contiguous(), k_perm.contiguous(), v_perm.contiguous(), q_off, k_off,
                                          mask, k_cent.contiguous(), v_means.contiguous(), scale, compensate)
    inverse = torch.argsort(q_order_h, dim=-1)
    out = torch.gather(out_p, 2, inverse.unsqueeze(-1).expand(-1, -1, -1, dim))
    lse = torch.gather(lse_p, 2, inverse)
    probe = None if err_sum is None else err_sum * q_counts.unsqueeze(-1).float()
    return out, lse, mask, cost, probe


def ear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    density: float = 0.25,
    num_q_clusters: int = 64,
    num_k_clusters: int = 256,
    router: str = "error",
    compensate: bool = True,
    causal: bool = False,
    causal_chunk: int = 1024,
    kmeans_iters: int = 10,
    seed: int = 0,
    scale: float | None = None,
    state: EARState | None = None,
    return_info: bool = False,
):
    """SVG-EAR attention (see the module docstring); returns (B, Hq, Nq, D) in q's dtype, or (out, EARInfo).

    router="error", compensate=True: EAR. router="score", compensate=False: the SVG2-style peer (each query cluster
    keeps at least its best block). router="score", compensate=True: score routing with compensation.
    """
    check_ear_args(q, k, v, density, num_q_clusters, num_k_clusters, router, causal, causal_chunk, kmeans_iters)
    if state is not None and causal:
        raise ValueError("ear_attention: `state` (warm-started clustering) is for non-causal use only.")
    density = float(density)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        if causal:
            out, info = _ear_causal(q, k, v, density, num_q_clusters, num_k_clusters, router, compensate,
                                    causal_chunk, kmeans_iters, seed, scale)
        else:
            out, info = _ear_full(q, k, v, density, num_q_clusters, num_k_clusters, router, compensate,
                                  kmeans_iters, seed, scale, state, return_info)
    out = out.to(q.dtype)
    return (out, info) if return_info else out


def _ear_full(q, k, v, density, num_q_clusters, num_k_clusters, router, compensate, iters, seed, scale, state,
              want_probe):
    hk = k.shape[1]
    warm = state is not None and state.calls > 0
    q_labels, q_cent = _cluster(_group_query_points(q, hk), num_q_clusters, iters, seed,
                                state.q_centroids if warm else None)
    k_labels, k_cent = _cluster(k, num_k_clusters, iters, seed + 1, state.k_centroids if warm else None)
    v_means, _ = kmeans_update(v, k_labels, torch.zeros(*v.shape[:2], k_cent.shape[-2], v.shape[-1],
                                                         device=v.device))
    if state is not None:
        state.q_centroids, state.k_centroids, state.calls = q_cent, k_cent, state.calls + 1
    out, lse, mask, cost, probe = _routed_attention(
        q, k, v, q_labels, q_cent, k_labels, k_cent, v_means, density=density, router=router,
        compensate=compensate, scale=scale, per_row=False, want_probe=want_probe,
    )
    exact = int(torch.where(mask, cost, 0).sum())
    total = q.shape[0] * hk * q.shape[2] * k.shape[2]
    info = EARInfo(lse=lse, density=exact / total, exact_pairs=exact, routed_pairs=total, block_mask=mask,
                   block_cost=cost, probe_error=probe)
    return out, info


def _ear_causal(q, k, v, density, num_q_clusters, num_k_clusters, router, compensate, chunk, iters, seed, scale):
    bsz, hq, nq, dim = q.shape
    hk, nk = k.shape[1], k.shape[2]
    offset = nk - nq
    last_chunk = (nk - 1) // chunk
    q_points = _group_query_points(q, hk)
    # Key clusters of the chunks that can be routed (1 .. last_chunk - 1, all full), chunk-major so that a chunk's
    # k-means initialisation does not depend on how many chunks follow it.
    n_routed = max(0, last_chunk - 1)
    if n_routed:
        keys = k[:, :, chunk: (n_routed + 1) * chunk].unflatten(2, (n_routed, chunk)).permute(2, 0, 1, 3, 4)
        vals = v[:, :, chunk: (n_routed + 1) * chunk].unflatten(2, (n_routed, chunk)).permute(2, 0, 1, 3, 4)
        labels, cent = _cluster(keys.contiguous(), num_k_clusters, iters, seed + 1)
        vmeans, _ = kmeans_update(vals, labels, torch.zeros(*cent.shape[:-1], v.shape[-1], device=v.device))
        ck = cent.shape[-2]
        labels = labels + (torch.arange(n_routed, device=k.device) * ck).view(-1, 1, 1, 1)
        # (n, B, Hk, ...) -> (B, Hk, n*...)
        k_labels_all = labels.permute(1, 2, 0, 3).flatten(2)
        k_cent_all = cent.permute(1, 2, 0, 3, 4).flatten(2, 3)
        v_means_all = vmeans.permute(1, 2, 0, 3, 4).flatten(2, 3)
    out = torch.empty(bsz, hq, nq, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(nk, device=q.device)
    exact_pairs = routed_pairs = 0
    first_q_chunk = offset // chunk
    for a in range(first_q_chunk, last_chunk + 1):
        r0, r1 = max(0, a * chunk - offset), min(nq, (a + 1) * chunk - offset)
        qa = q[:, :, r0:r1]
        q_pos = torch.arange(r0, r1, device=q.device) + offset
        near = key_pos[:chunk] if a == 0 else torch.cat([key_pos[:chunk], key_pos[a * chunk: (a + 1) * chunk]])
        mask = near.unsqueeze(0) <= q_pos.unsqueeze(1)
        o, lse_a = dense_attention_lse(qa, k[:, :, near], v[:, :, near], mask, scale)
        if a >= 2:
            n_keys = (a - 1) * chunk
            kr, vr = k[:, :, chunk: a * chunk], v[:, :, chunk: a * chunk]
            p0, p1 = max(0, (a - 1) * chunk - offset), max(0, a * chunk - offset)
            routed_pairs += bsz * hk * (r1 - r0) * n_keys
            if p1 > p0:  # the previous chunk's queries are in this call: their centroids route this chunk
                ncq = min(num_q_clusters, p1 - p0)
                prev = kmeans(q_points[:, :, p0:p1], ncq, iters=iters, seed=seed + a)
                q_cent, _ = kmeans_update(q_points[:, :, p0:p1], prev.labels, prev.centroids)
                q_labels = kmeans_assign(q_points[:, :, r0:r1], q_cent)
                ncr = (a - 1) * ck
                o_r, lse_r, sel, cost, _ = _routed_attention(
                    qa, kr, vr, q_labels, q_cent, k_labels_all[..., :n_keys], k_cent_all[:, :, :ncr],
                    v_means_all[:, :, :ncr], density=density, router=router, compensate=compensate, scale=scale,
                    per_row=True, want_probe=False,
                )
                exact_pairs += int(torch.where(sel, cost, 0).sum())
            else:
                o_r, lse_r = dense_attention_lse(qa, kr, vr, None, scale)
                exact_pairs += bsz * hk * (r1 - r0) * n_keys
            o, lse_a = lse_merge(o, lse_a, o_r, lse_r)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, lse_a
    info = EARInfo(lse=lse, density=exact_pairs / routed_pairs if routed_pairs else 1.0, exact_pairs=exact_pairs,
                   routed_pairs=routed_pairs)
    return out, info
