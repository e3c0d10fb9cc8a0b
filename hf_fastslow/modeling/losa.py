"""LOSA: locality-aware sparse attention for block-wise diffusion LMs (Xi et al., arXiv 2604.12056), as a transformers
attention function.

While one block of b tokens is denoised over several steps, the prefix (P cached tokens) does not change. Per layer
LOSA keeps every block query's prefix-attention output and log-sum-exp (o^P, l^P) from the step that last computed
it. At each later step only the "active" block tokens, those whose query moved most since their reference query,
attend to the prefix again, and only to the union of the QUEST pages they select (ceil(budget / page_size) pages per
query, scored by the page key min/max bound); the other ("stable") tokens reuse their cached (o^P, l^P). Attention
inside the block is always dense, and the two parts are joined exactly with `lse_merge`. The first step of a block
is dense over the prefix (`dense_first_step`); with `dense_first_step=False` every block query selects (QUEST-naive).

    from hf_fastslow.modeling.losa import LosaConfig, register_losa
    register_losa(); model.set_attn_implementation("losa")
    out = model.generate(ids, custom_generate=block_diffusion_generate, block_size=16, steps=4,
                         losa=LosaConfig(budget=256, active_k=5), max_new_tokens=128)

Protocol with the decoder (hf_fastslow.generation.block_diffusion): the decoder builds `LosaState(config, model)`,
passes `losa_state=state` to every forward, calls `state.start_block()` before a block's first denoising forward and
`state.end_block()` before the commit pass. Outside start_block..end_block (prefill, commit), for layers in
`skip_layers` and while the prefix is shorter than `min_prefix`, attention is dense (transformers' SDPA function).
The block's KV is not in the cache during denoising, so the prefix length is P = kv_len - q_len.

Scope, as the paper: batch 1 and block diffusion (the prefix is seen by every block query). Anything else is refused
with an error: batch > 1, the implementation active without `losa_state`, dropout > 0, sliding windows, masks that
hide different prefix keys from different block queries. Page summaries are kept per layer and extended as committed
blocks reach the cache, so one state serves one sequence (one generate call).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hf_fastslow.integrations.attention import attention_implementation, register_attention, sdpa_attention_function
from hf_fastslow.kernels.ear import dense_attention_lse
from hf_fastslow.kernels.losa import (
    prefix_attention_lse,
    quest_page_scores,
    quest_page_summaries,
    select_union_pages,
    union_sparse_prefix_attention,
)
from hf_fastslow.kernels.lse_merge import lse_merge

REFERENCES = ("last_refresh", "previous")
STEP_KINDS = ("dense_first", "sparse", "fallback")
_LOSA_NAMES: set[str] = set()  # attention implementation names registered by register_losa()


@dataclass
class LosaConfig:
    """LOSA's knobs. `budget`: prefix tokens one active query may select (ceil(budget / page_size) pages);
    `active_k` / `active_frac`: the active-set rule, top-k block tokens by query change, or (when set) the top
    fraction ceil(active_frac * b); `reference`: the query change is measured against the query that produced the
    token's cached prefix output ("last_refresh", bounded error) or against the previous step's ("previous");
    `min_prefix`: shorter prefixes are attended densely; `skip_layers`: layers always dense; `track_naive`: also count
    what QUEST-naive selection (every block query selects) would load on the same steps, for `kv_density`."""

    budget: int = 256
    page_size: int = 16
    active_k: int = 5
    active_frac: float | None = None
    dense_first_step: bool = True
    reference: str = "last_refresh"
    min_prefix: int = 1024
    skip_layers: tuple[int, ...] = ()
    track_naive: bool = True

    def __post_init__(self):
        if not isinstance(self.page_size, int) or self.page_size <= 0:
            raise ValueError(f"LosaConfig: page_size must be a positive int; got {self.page_size!r}.")
        if not isinstance(self.budget, int) or self.budget < self.page_size:
            raise ValueError(f"LosaConfig: budget ({self.budget!r}) must be an int >= page_size ({self.page_size}): "
                             "a query selects whole pages.")
        if self.active_frac is None:
            if not isinstance(self.active_k, int) or self.active_k < 1:
                raise ValueError(f"LosaConfig: active_k must be an int >= 1; got {self.active_k!r}.")
        elif not 0.0 < float(self.active_frac) <= 1.0:
            raise ValueError(f"LosaConfig: active_frac must lie in (0, 1]; got {self.active_frac!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"LosaConfig: reference must be one of {REFERENCES}; got {self.reference!r}.")
        if not isinstance(self.min_prefix, int) or self.min_prefix < 0:
            raise ValueError(f"LosaConfig: min_prefix must be an int >= 0; got {self.min_prefix!r}.")
        self.skip_layers = tuple(int(i) for i in self.skip_layers)

    @property
    def pages_per_query(self) -> int:
        return math.ceil(self.budget / self.page_size)

    def active_count(self, block_len: int) -> int:
        """Block tokens refreshed per step after the first."""
        if self.active_frac is not None:
            return max(1, min(block_len, math.ceil(float(self.active_frac) * block_len)))
        return min(self.active_k, block_len)


@dataclass
class _BlockCache:
    """One layer's reusable prefix attention for the current block."""

    prefix_len: int
    o_prefix: torch.Tensor  # (Hq, b, d) prefix-attention output of every block query
    lse_prefix: torch.Tensor  # (Hq, b)
    q_ref: torch.Tensor  # (Hq, b, d) the query each token's cached output was computed with
    q_prev: torch.Tensor  # (Hq, b, d) the previous step's query
    steps: int = 1
    last_active: torch.Tensor | None = None  # block positions refreshed at the last step
    last_page_index: torch.Tensor | None = None  # (Hkv, M) pages loaded at the last step (None: dense)


@dataclass
class _PageSummaries:
    length: int  # prefix keys summarised
    kmin: torch.Tensor  # (Hkv, n_pages, d)
    kmax: torch.Tensor


@dataclass
class _Counter:
    loaded: int = 0  # prefix key positions loaded by LOSA, summed over KV heads
    naive: int = 0  # the same for QUEST-naive selection on the same steps (when tracked)
    total: int = 0  # P * Hkv: what dense attention loads
    calls: int = 0


class LosaState:
    """Per-sequence LOSA state kept outside the model: per layer the block's cached (o^P, l^P), reference queries and
    page summaries, plus density counters. Build one per generate call: `LosaState(config, model)`; `model` must run
    a LOSA attention implementation (`register_losa()` then `model.set_attn_implementation("losa")`). Pass
    `model=None` only to drive `losa_attention` directly."""

    def __init__(self, config: LosaConfig, model: torch.nn.Module | None = None):
        if not isinstance(config, LosaConfig):
            raise TypeError(f"LosaState needs a LosaConfig; got {type(config).__name__}.")
        if model is not None:
            name = attention_implementation(model)
            if name not in _LOSA_NAMES:
                raise ValueError(f"LosaState: the model runs attn_implementation={name!r}, not LOSA; call "
                                 "register_losa() and model.set_attn_implementation('losa') first.")
        self.config = config
        self.in_block = False
        self.blocks = 0
        self._block_caches = {}  # layer_idx -> _BlockCache
        self._pages: dict[int, _PageSummaries] = {}
        self.counters: dict[str, _Counter] = {kind: _Counter() for kind in STEP_KINDS}
        # wall-clock seconds inside the attention function per kind ("outside" = dense calls outside a block);
        # "naive_bookkeeping" = the part of those spent counting what QUEST-naive would load (not attention work);
        # host wall-clock: on CUDA it counts launches, not kernel time, unless the caller synchronizes
        self.seconds: dict[str, float] = dict.fromkeys((*STEP_KINDS, "outside", "naive_bookkeeping"), 0.0)

    # -- protocol -------------------------------------------------------------------------------------------------
    def start_block(self) -> None:
        """A new block: forget every layer's cached prefix outputs; attention becomes LOSA until `end_block`."""
        self._block_caches.clear()
        self.in_block = True
        self.blocks += 1

    def end_block(self) -> None:
        """The block is about to be committed: back to dense attention, cached prefix outputs dropped."""
        self._block_caches.clear()
        self.in_block = False

    def layer_cache(self, layer_idx: int) -> _BlockCache | None:
        """The current block's cache of a layer (None before its first step in the block); for inspection."""
        return self._block_caches.get(layer_idx)

    # -- page summaries, extended as committed blocks reach the cache -----------------------------------------------
    def page_summaries(self, layer_idx: int, key_prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ps, length = self.config.page_size, key_prefix.shape[1]
        entry = self._pages.get(layer_idx)
        if entry is None or entry.length > length or entry.kmin.shape[0] != key_prefix.shape[0]:
            kmin, kmax = quest_page_summaries(key_prefix, ps)
        elif entry.length == length:
            return entry.kmin, entry.kmax
        else:  # append: recompute from the last partial page on
            full = entry.length // ps
            new_min, new_max = quest_page_summaries(key_prefix[:, full * ps:], ps)
            kmin, kmax = torch.cat([entry.kmin[:, :full], new_min], 1), torch.cat([entry.kmax[:, :full], new_max], 1)
        self._pages[layer_idx] = _PageSummaries(length, kmin, kmax)
        return kmin, kmax

    def _record(self, kind: str, loaded: int, naive: int, total: int) -> None:
        counter = self.counters[kind]
        counter.loaded += loaded
        counter.naive += naive
        counter.total += total
        counter.calls += 1


def kv_density(state: LosaState) -> dict:
    """Loaded prefix-KV density over the attention calls made inside blocks (every layer, KV head and step).

    `losa`: LOSA's loaded fraction over all those calls (dense first steps and dense fallbacks count as 1);
    `losa_sparse_steps`: over the sparse steps only (the paper's figure leaves the dense first step out);
    `naive`: QUEST-naive selection (every block query selects its pages) on the same calls (None if not tracked);
    `dense`: 1.0; `calls`: attention calls per kind (dense_first, sparse, fallback).
    """
    counters = state.counters
    total = sum(c.total for c in counters.values())
    sparse = counters["sparse"]
    return {
        "dense": 1.0,
        "losa": sum(c.loaded for c in counters.values()) / total if total else float("nan"),
        "losa_sparse_steps": sparse.loaded / sparse.total if sparse.total else float("nan"),
        "naive": (sum(c.naive for c in counters.values()) / total
                  if total and state.config.track_naive else None),
        "calls": {kind: c.calls for kind, c in counters.items()},
        "prefix_tokens": total,
    }


# -- the attention function -----------------------------------------------------------------------------------------
def _split_mask(mask: torch.Tensor | None, q_len: int, prefix: int, is_causal: bool, device):
    """(key_valid (P,) bool or None, block_mask (q, q) bool) from the 4D mask the model passes (True / 0 = attend)."""
    if mask is None:
        block = torch.ones(q_len, q_len, dtype=torch.bool, device=device)
        return None, block.tril() if is_causal else block
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] != 1:
        raise ValueError(f"losa_attention: expected a [1, 1, q, kv] attention mask; got {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask[allowed] != 0).any()):
            raise ValueError("losa_attention: additive attention biases are not supported (only 0 / -inf masks).")
        mask = allowed
    mask = mask[0, 0]
    prefix_part = mask[:, :prefix]
    key_valid = prefix_part[0]
    if not bool((prefix_part == key_valid).all()):
        raise ValueError("losa_attention: block queries see different prefix keys; LOSA needs block diffusion "
                         "(every block query sees the whole non-padded prefix).")
    return (None if bool(key_valid.all()) else key_valid), mask[:, prefix:]


def _loaded_tokens(page_index: torch.Tensor, page_size: int, prefix: int) -> int:
    used = page_index[page_index >= 0]
    return int((prefix - used * page_size).clamp(max=page_size).sum().item())


def _page_valid(key_valid: torch.Tensor | None, page_size: int, prefix: int) -> torch.Tensor | None:
    if key_valid is None:
        return None
    n_pages = -(-prefix // page_size)
    padded = torch.zeros(n_pages * page_size, dtype=torch.bool, device=key_valid.device)
    padded[:prefix] = key_valid
    return padded.view(n_pages, page_size).any(dim=1)


def losa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query (1, Hq, q, d), key/value (1, Hkv, kv, d) -> (out (1, q, Hq, d), None)."""
    state = kwargs.pop("losa_state", None)
    if state is None:
        raise ValueError("losa_attention: the LOSA attention implementation is active but no `losa_state` was passed; "
                         "pass losa_state=LosaState(config, model) to every forward (block_diffusion_generate(..., "
                         "losa=LosaConfig(...)) does), or switch the model back to 'sdpa'.")
    if not isinstance(state, LosaState):
        raise TypeError(f"losa_attention: losa_state must be a LosaState; got {type(state).__name__}.")
    if query.shape[0] != 1:
        raise ValueError(f"losa_attention: LOSA supports batch size 1 only (as the paper); got {query.shape[0]}.")
    if dropout and dropout > 0:
        raise ValueError("losa_attention: attention dropout > 0 (training mode) is not supported; call model.eval().")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("losa_attention: sliding-window layers are not supported.")
    cfg = state.config
    layer = int(getattr(module, "layer_idx", 0) or 0)
    q_len, kv_len = query.shape[2], key.shape[2]
    prefix = kv_len - q_len
    start = time.perf_counter()
    if not state.in_block or prefix <= 0 or prefix < cfg.min_prefix or layer in cfg.skip_layers:
        out = sdpa_attention_function()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        kind = "fallback" if state.in_block else "outside"
        if state.in_block:
            hkv = key.shape[1]
            state._record("fallback", hkv * prefix, hkv * prefix, hkv * prefix)
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        key_valid, block_mask = _split_mask(attention_mask, q_len, prefix, getattr(module, "is_causal", True),
                                            query.device)
        merged, kind = _block_step(state, layer, query[0], key[0], value[0], prefix, key_valid, block_mask, scale)
        out = (merged.transpose(0, 1).unsqueeze(0).to(query.dtype), None)
    state.seconds[kind] += time.perf_counter() - start
    return out


def _block_step(state, layer, q, k, v, prefix, key_valid, block_mask, scale):
    """One denoising step of one layer: q (Hq, b, d), k/v (Hkv, P + b, d) -> ((Hq, b, d), step kind)."""
    cfg = state.config
    ps, hkv, b = cfg.page_size, k.shape[0], q.shape[1]
    kp, vp = k[:, :prefix], v[:, :prefix]
    kmin, kmax = state.page_summaries(layer, kp)
    page_valid = _page_valid(key_valid, ps, prefix)
    cache = state._block_caches.get(layer)
    if cache is not None and (cache.prefix_len != prefix or cache.o_prefix.shape[1] != b):
        raise ValueError(f"losa_attention: layer {layer} changed shape inside a block (prefix {cache.prefix_len} -> "
                         f"{prefix}, block {cache.o_prefix.shape[1]} -> {b}); call start_block() for a new block.")
    total = hkv * prefix

    def union_of(queries):
        return select_union_pages(quest_page_scores(queries, kmin, kmax), cfg.pages_per_query, page_valid)

    if cache is None and cfg.dense_first_step:
        o_p, l_p = prefix_attention_lse(q, kp, vp, scale, key_valid)
        active, page_index, kind, loaded = torch.arange(b, device=q.device), None, "dense_first", total
    else:
        if cache is None:
            active = torch.arange(b, device=q.device)
        else:
            reference = cache.q_prev if cfg.reference == "previous" else cache.q_ref
            delta = (q.float() - reference.float()).pow(2).sum(-1).mean(0)  # (b,) ||q_i - ref_i||^2, head mean
            active = delta.topk(cfg.active_count(b)).indices.sort().values
        page_index = union_of(q[:, active])
        o_a, l_a = union_sparse_prefix_attention(q[:, active], kp, vp, page_index, ps, scale, key_valid)
        if cache is None:
            o_p, l_p = o_a, l_a
        else:
            o_p, l_p = cache.o_prefix.clone(), cache.lse_prefix.clone()
            o_p[:, active], l_p[:, active] = o_a.to(o_p.dtype), l_a.to(l_p.dtype)
        kind, loaded = "sparse", _loaded_tokens(page_index, ps, prefix)
    naive = 0
    if cfg.track_naive:
        begin = time.perf_counter()
        naive = loaded if (kind == "sparse" and active.numel() == b) else _loaded_tokens(union_of(q), ps, prefix)
        state.seconds["naive_bookkeeping"] += time.perf_counter() - begin
    state._record(kind, loaded, naive, total)
    if cache is None:
        cache = _BlockCache(prefix, o_p, l_p, q.clone(), q.clone(), steps=0)
        state._block_caches[layer] = cache
    else:
        cache.o_prefix, cache.lse_prefix = o_p, l_p
        cache.q_ref[:, active] = q[:, active]
        cache.q_prev = q.clone()
    cache.steps += 1
    cache.last_active, cache.last_page_index = active, page_index
    o_b, l_b = dense_attention_lse(q[None], k[None, :, prefix:], v[None, :, prefix:], block_mask, scale)
    out, _ = lse_merge(o_p, l_p, o_b[0].to(o_p.dtype), l_b[0])
    return out, kind


def register_losa(name: str = "losa") -> str:
    """Register `losa_attention` as `attn_implementation=name` (AttentionInterface and AttentionMaskInterface, so the
    function receives the padding / block masks); then `model.set_attn_implementation(name)`."""
    register_attention(name, losa_attention)
    _LOSA_NAMES.add(name)
    return name

