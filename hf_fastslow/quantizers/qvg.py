"""QVG cache for text LLMs: chunked k-means smoothing + progressive residual quantization of the KV history (Xi et al.,
"Quant VideoGen: Auto-Regressive Long Video Generation via 2-Bit KV-Cache Quantization", arXiv 2602.02958).

Per layer the history is laid out as
    [ sinks | span_0 | span_1 | ... | window ]
- sinks: the first tokens of each sequence (attention sinks), exact, as the model computed them;
- spans: chunks of `chunk_tokens` tokens, each compressed once by `prq_compress` (keys before RoPE) when it leaves
  the window, and never touched again (a crop inside a span keeps its first tokens' codes and ids as they are);
- window: the newest tokens, exact (fewer than `(keep_recent_chunks + 1) * chunk_tokens`).
`update` returns the tokens of earlier calls rebuilt from that storage (spans decompressed, RoPE re-applied at each
token's own position) followed by this call's tokens exactly as the model computed them, like `DynamicLayer.update`.

RoPE positions: a forward pre-hook on every `self_attn` hands the call's `position_ids` to the cache (transformers
5.17 passes nothing to `Cache.update`); the cache keeps one int32 row of positions per sequence, so left-padded rows
are rotated at their own positions. Memory: `nbytes()` walks every storage the cache holds (`storage_bytes`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..evaluation.memory import storage_bytes
from ..integrations import apply_rotary_fn, cache_from_kwargs, decoder_layers, rotary_embeddings
from .attention_hooks import attach_pre_hooks, detach_pre_hooks
from .qvg_codec import PackedPRQ, prq_compress, prq_decompress_many
from .qvg_config import QVGConfig

__all__ = ["QVGCache", "QVGConfig", "QVGLayer", "attach_qvg", "detach_qvg", "qvg_cache_factory"]

_HOOKS_ATTR = "_hf_fastslow_qvg_hooks"


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A compact copy of a slice, so that the cache never keeps a larger buffer alive through a view."""
    return None if t is None else t.clone(memory_format=torch.contiguous_format)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return _own(b) if a is None else torch.cat([a, b], dim=-2)


class _ExactChunk:
    """A chunk stored exactly (quantization off): same interface as `PackedPRQ` for the cache."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    @property
    def num_tokens(self) -> int:
        return self.x.shape[-2]

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def first_tokens(self, n: int) -> _ExactChunk:
        return _ExactChunk(_own(self.x[..., :n, :]))

    def index_select(self, dim: int, index: torch.Tensor) -> _ExactChunk:
        return _ExactChunk(self.x.index_select(dim, index.to(self.x.device)))


def _decompress_all(chunks: list, dtype: torch.dtype) -> torch.Tensor:
    """The chunks of a layer decompressed and joined along tokens (equal-layout chunks in one kernel call)."""
    if isinstance(chunks[0], _ExactChunk):
        return torch.cat([c.x.to(dtype) for c in chunks], dim=-2)
    return prq_decompress_many(chunks, dtype)


class _Span:
    """One compressed chunk of a layer: keys (pre-RoPE unless configured otherwise) and values."""

    def __init__(self, k: PackedPRQ | _ExactChunk, v: PackedPRQ | _ExactChunk):
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return self.k.num_tokens

    def map(self, fn) -> _Span:
        return _Span(fn(self.k), fn(self.v))


class _Shared:
    """State the cache and its layers share: config, model binding, RoPE positions, per-forward transients."""

    def __init__(self, model: nn.Module, config: QVGConfig, compute_dtype: torch.dtype, attns: list[nn.Module]):
        self.config = config
        self.compute_dtype = compute_dtype
        self.model_ref = weakref.ref(model)
        self.attn_refs = [weakref.ref(a) for a in attns]
        self.attn_index = {id(a): i for i, a in enumerate(attns)}
        self.positions: torch.Tensor | None = None  # (B, T) int32
        self.sink_end: int | None = None  # exact-region length, fixed by the first forward
        self.stash: dict[int, torch.Tensor | None] = {}
        self.rope_memo: dict = {}

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise RuntimeError("The model this QVGCache was built for no longer exists.")
        return model


class QVGLayer(DynamicLayer):
    """One layer of a `QVGCache`: exact sinks, compressed spans, exact window."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, shared: _Shared, layer_idx: int):
        super().__init__()
        self._shared = shared
        self.layer_idx = layer_idx
        self.sink_k = self.sink_v = None
        self.spans: list[_Span] = []
        self.tail_k = self.tail_v = None

    # -- sizes ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _len(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.shape[-2]

    @property
    def n_sink(self) -> int:
        return self._len(self.sink_k)

    @property
    def n_compressed(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def n_window(self) -> int:
        return self._len(self.tail_k)

    def get_seq_length(self) -> int:
        return self.n_sink + self.n_compressed + self.n_window

    def get_max_length(self) -> int:
        return -1

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        self.is_initialized = True

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.tail_k = self.tail_v = None
        self.spans = []
        self.keys = self.values = None
        self.is_initialized = False

    def packed_nbytes(self) -> int:
        return sum(s.k.nbytes() + s.v.nbytes() for s in self.spans)

    # -- RoPE -----------------------------------------------------------------------------------------------------
    def _rotate(self, k: torch.Tensor, start: int, stop: int, inverse: bool) -> torch.Tensor:
        """Apply RoPE (or undo it) to keys (B, H, n, D) of tokens [start, stop), at their recorded positions."""
        sh = self._shared
        attn = sh.attn_refs[self.layer_idx]()
        key = (getattr(attn, "layer_type", None), k.dtype, k.device, start, stop)
        cos_sin = sh.rope_memo.get(key)
        if cos_sin is None:
            pos = sh.positions[:, start:stop].long()
            cos_sin = rotary_embeddings(sh.model, attn, k, pos)
            sh.rope_memo[key] = cos_sin
        cos, sin = cos_sin
        return apply_rotary_fn(attn)(k[:, :1], k, cos, -sin if inverse else sin)[1]

    # -- update ---------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        sh = self._shared
        position_ids = sh.stash.pop(self.layer_idx, None)  # taken even when the call fails: nothing stays behind
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        if self.layer_idx == 0:
            sh.rope_memo.clear()
            self._append_positions(position_ids, key_states.shape[0], n_new, key_states.device)
        past = self.get_seq_length()
        if sh.positions is None or sh.positions.shape[1] != past + n_new:
            raise RuntimeError(
                f"QVGCache: layer {self.layer_idx} holds {past} tokens and got {n_new}, but the cache recorded "
                f"{0 if sh.positions is None else sh.positions.shape[1]} positions; layers must be updated in order "
                "(layer 0 first) once per forward."
            )
        old_k, old_v = self._rebuild(past)
        dtype = sh.compute_dtype
        k_new, v_new = key_states.to(dtype), value_states.to(dtype)
        n_to_sink = max(0, min(n_new, sh.sink_end - self.n_sink)) if self.n_compressed + self.n_window == 0 else 0
        if n_to_sink:
            self.sink_k = _cat(self.sink_k, k_new[..., :n_to_sink, :])
            self.sink_v = _cat(self.sink_v, v_new[..., :n_to_sink, :])
        if n_to_sink < n_new:
            self.tail_k = _cat(self.tail_k, k_new[..., n_to_sink:, :])
            self.tail_v = _cat(self.tail_v, v_new[..., n_to_sink:, :])
        self._flush()
        if self.layer_idx == len(sh.attn_refs) - 1:
            sh.rope_memo.clear()
        if old_k is None:
            return key_states, value_states
        keys = torch.cat([old_k.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([old_v.to(value_states.dtype), value_states], dim=-2)
        return keys, values

    def _check_states(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"QVGCache expects key/value states of shape (batch, kv_heads, tokens, head_dim); got "
                f"{tuple(k.shape)} and {tuple(v.shape)}."
            )
        if k.shape[-1] % self._shared.config.block_size and self._shared.config.quantized:
            raise ValueError(
                f"QVGCache: head dim {k.shape[-1]} is not a multiple of block_size {self._shared.config.block_size}."
            )
        positions = self._shared.positions
        if positions is not None and positions.shape[0] != k.shape[0]:
            raise ValueError(
                f"QVGCache holds a batch of {positions.shape[0]} sequences, got {k.shape[0]}; call cache.reset() or "
                "build a new cache for a new batch."
            )
        if self.sink_k is not None or self.tail_k is not None or self.spans:
            ref = self.sink_k if self.sink_k is not None else self.tail_k
            if ref is not None and (ref.shape[1] != k.shape[1] or ref.shape[-1] != k.shape[-1]):
                raise ValueError(
                    f"QVGCache layer {self.layer_idx} holds {ref.shape[1]} heads of dim {ref.shape[-1]}, got "
                    f"{k.shape[1]} heads of dim {k.shape[-1]}."
                )

    def _append_positions(self, pos: torch.Tensor | None, bsz: int, n_new: int, device) -> None:
        sh = self._shared
        past = 0 if sh.positions is None else sh.positions.shape[1]
        if pos is None:
            pos = torch.arange(past, past + n_new, device=device).unsqueeze(0)
        if pos.shape[-1] != n_new:
            raise ValueError(f"QVGCache: got {n_new} new tokens but position_ids of shape {tuple(pos.shape)}.")
        pos = pos.to(device=device, dtype=torch.int32).expand(bsz, n_new)
        if sh.positions is None:
            sh.positions = _own(pos)
            # Each row's sequence starts at its smallest position (left padding sits before it, at position 1
            # in transformers): the exact region covers the longest padding plus the sink tokens.
            first = (pos == pos.min(dim=1, keepdim=True).values).int().argmax(dim=1)
            sh.sink_end = int(first.max()) + sh.config.sink_tokens if sh.config.sink_tokens else 0
        else:
            sh.positions = torch.cat([sh.positions, pos], dim=1)

    def _flush(self) -> None:
        """Compress full chunks that left the window (each once)."""
        cfg = self._shared.config
        chunk = cfg.chunk_tokens
        while self.n_window >= (cfg.keep_recent_chunks + 1) * chunk:
            start = self.n_sink + self.n_compressed
            k, v = self.tail_k[..., :chunk, :], self.tail_v[..., :chunk, :]
            self.spans.append(self._compress(k, v, start))
            self.tail_k, self.tail_v = _own(self.tail_k[..., chunk:, :]), _own(self.tail_v[..., chunk:, :])
            if self.n_window == 0:
                self.tail_k = self.tail_v = None

    def _compress(self, k: torch.Tensor, v: torch.Tensor, start: int) -> _Span:
        cfg = self._shared.config
        stop = start + k.shape[-2]
        if cfg.pre_rope_keys:
            k = self._rotate(k.float(), start, stop, inverse=True)
        if not cfg.quantized:
            return _Span(_ExactChunk(_own(k.float() if cfg.pre_rope_keys else k)), _ExactChunk(_own(v)))
        # One seed per (layer, chunk, K/V): reproducible, and different clusters' initialisations are independent.
        seed = cfg.seed * 1_000_003 + self.layer_idx * 100_003 + start * 2
        kw = dict(nbits=cfg.nbits, block_size=cfg.block_size, num_stages=cfg.num_stages,
                  num_centroids=cfg.centroids_per_stage, kmeans_iters=cfg.kmeans_iters, asymmetric=cfg.asymmetric,
                  centroid_dtype=cfg.centroid_dtype)
        return _Span(prq_compress(k, seed=seed, **kw), prq_compress(v, seed=seed + 1, **kw))

    def _rebuild(self, past: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """K (post-RoPE) and V of the `past` stored tokens, in the compute dtype."""
        if past == 0:
            return None, None
        dtype = self._shared.compute_dtype
        ks, vs = [], []
        if self.sink_k is not None:
            ks.append(self.sink_k)
            vs.append(self.sink_v)
        if self.spans:
            start = self.n_sink
            k = _decompress_all([s.k for s in self.spans], torch.float32)
            if self._shared.config.pre_rope_keys:
                k = self._rotate(k, start, start + k.shape[-2], inverse=False)
            ks.append(k.to(dtype))
            vs.append(_decompress_all([s.v for s in self.spans], dtype))
        if self.tail_k is not None:
            ks.append(self.tail_k)
            vs.append(self.tail_v)
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    # -- edits ----------------------------------------------------------------------------------------------------
    def truncate(self, new_len: int) -> None:
        """Keep the first `new_len` tokens; a span cut in the middle keeps its first tokens' codes unchanged."""
        if new_len >= self.get_seq_length():
            return
        n_sink = self.n_sink
        if new_len <= n_sink:
            self.sink_k, self.sink_v = _own(self.sink_k[..., :new_len, :]), _own(self.sink_v[..., :new_len, :])
            if new_len == 0:
                self.sink_k = self.sink_v = None
            self.spans, self.tail_k, self.tail_v = [], None, None
            return
        kept, at = [], n_sink
        for span in self.spans:
            if at >= new_len:
                break
            n = min(span.length, new_len - at)
            kept.append(span if n == span.length else span.map(lambda c, n=n: c.first_tokens(n)))
            at += n
        self.spans = kept
        rest = new_len - at
        if rest > 0:
            self.tail_k, self.tail_v = _own(self.tail_k[..., :rest, :]), _own(self.tail_v[..., :rest, :])
        else:
            self.tail_k = self.tail_v = None

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("Crop a QVGCache as a whole (`cache.crop(-n)`), not one of its layers.")

    def _map_batch(self, fn_tensor, fn_chunk) -> None:
        for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn_tensor(t))
        self.spans = [s.map(fn_chunk) for s in self.spans]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda c: c.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        positions = self._shared.positions  # not yet repeated: the cache repeats it after its layers
        rows = torch.arange(0 if positions is None else positions.shape[0]).repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda c: c.index_select(0, rows))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices).flatten()
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._map_batch(lambda t: t.index_select(0, idx.to(t.device)), lambda c: c.index_select(0, idx))


class QVGCache(Cache):
    """A transformers `Cache` that stores the KV history as QVG-compressed chunks (see the module docstring).

    ```python
    cache = QVGCache(model, QVGConfig(nbits=2, num_stages=2, chunk_tokens=256))
    out = model.generate(**inputs, cache=cache)          # past_key_values=cache on transformers < 5.24
    cache.nbytes(), cache.compression_ratio()            # bytes held (storage walk), fp16-KV bytes / bytes held
    ```
    Or, after `import hf_fastslow`: `model.generate(**inputs, cache_implementation="qvg", cache_config={...})`.
    """

    is_compileable = False

    def __init__(self, model: nn.Module, config: QVGConfig | dict | None = None, **kwargs):
        if config is None:
            config = QVGConfig(**kwargs)
        elif isinstance(config, dict):
            config = QVGConfig.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("Pass either a QVGConfig or keyword arguments, not both.")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"QVGCache needs the transformers model it will serve, got {type(model).__name__}.")
        attns = [layer.self_attn for layer in decoder_layers(model)]
        head_dim = getattr(attns[0], "head_dim", None)
        if config.quantized and head_dim is not None and head_dim % config.block_size:
            raise ValueError(f"QVGConfig.block_size {config.block_size} does not divide the head dim {head_dim}.")
        self.config = config
        compute_dtype = config.compute_dtype or next(model.parameters()).dtype
        self._shared = _Shared(model, config, compute_dtype, attns)
        super().__init__(layers=[QVGLayer(self._shared, i) for i in range(len(attns))])
        attach_qvg(model)

    @property
    def model(self) -> nn.Module:
        return self._shared.model

    @property
    def positions(self) -> torch.Tensor | None:
        return self._shared.positions

    def nbytes(self) -> int:
        """Bytes this cache holds: every storage reachable from it, counted once at its full size."""
        return storage_bytes(self)

    def packed_nbytes(self) -> int:
        """Bytes of the compressed spans alone (centroids, ids, codes, scales) of every layer."""
        return sum(layer.packed_nbytes() for layer in self.layers)

    def fp16_kv_nbytes(self) -> int:
        """What an fp16 K/V cache would hold for the same tokens (2 bytes per K and V value)."""
        positions = self._shared.positions
        batch = 0 if positions is None else positions.shape[0]
        return sum(2 * 2 * batch * layer.kv_heads * layer.get_seq_length() * layer.head_dim for layer in self.layers
                   if layer.is_initialized)

    def compression_ratio(self) -> float:
        held = self.nbytes()
        return self.fp16_kv_nbytes() / held if held else 1.0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        sh = self._shared
        sh.positions, sh.sink_end = None, None
        sh.stash.clear()
        sh.rope_memo.clear()

    # -- hook side --------------------------------------------------------------------------------------------------
    def _receive_positions(self, attn: nn.Module, position_ids: torch.Tensor | None) -> None:
        idx = self._shared.attn_index.get(id(attn))
        if idx is None or self._shared.attn_refs[idx]() is not attn:
            raise RuntimeError("This QVGCache was built for another model: build one cache per model.")
        self._shared.stash[idx] = None if position_ids is None else position_ids.detach()

    # -- edits ------------------------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """`DynamicCache.crop` semantics: `crop(-n)` removes n tokens, `crop(0)` removes none; a positive value is
        the number of tokens to keep (the convention before transformers 5.18). Compressed spans are never
        re-compressed: a crop inside a span keeps the codes, ids and centroids of its first tokens."""
        total = self.get_seq_length()
        new_len = max(total + max_length, 0) if max_length <= 0 else min(max_length, total)
        if new_len >= total:
            return
        for layer in self.layers:
            layer.truncate(new_len)
        sh = self._shared
        sh.positions = _own(sh.positions[:, :new_len]) if new_len else None
        if new_len == 0:
            sh.sink_end = None
        sh.rope_memo.clear()

    def _map_positions(self, fn) -> None:
        if self._shared.positions is not None:
            self._shared.positions = fn(self._shared.positions)
        self._shared.rope_memo.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda p: p[indices])


# ---------------------------------------------------------------------------------------------------------------------
# Hooks and factory
# ---------------------------------------------------------------------------------------------------------------------
def _qvg_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    cache = cache_from_kwargs(kwargs)
    if isinstance(cache, QVGCache):
        cache._receive_positions(module, kwargs.get("position_ids"))
    return None


def attach_qvg(model: nn.Module) -> list:
    """Register (once) the pre-hooks that hand each attention call's position ids to a `QVGCache` (idempotent; the
    hooks do nothing when a forward runs with any other cache)."""
    return attach_pre_hooks(model, _HOOKS_ATTR, _qvg_pre_hook, (layer.self_attn for layer in decoder_layers(model)))


def detach_qvg(model: nn.Module) -> None:
    """Remove the hooks added by `attach_qvg`."""
    detach_pre_hooks(model, _HOOKS_ATTR)


def qvg_cache_factory(model: nn.Module, cache_config: dict) -> QVGCache:
    """Factory for `generate(cache_implementation="qvg", cache_config={...})`."""
    return QVGCache(model, QVGConfig.from_dict(dict(cache_config)))
