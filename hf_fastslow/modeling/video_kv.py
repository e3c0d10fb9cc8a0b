"""A KV cache for chunk-by-chunk (autoregressive) video diffusion with diffusers' Wan, and its attention processor.

QVG (Xi et al., "Quant VideoGen: Auto-Regressive Long Video Generation via 2-Bit KV-Cache Quantization",
arXiv 2602.02958) compresses the K/V of finished chunks; this module holds them. Per self-attention layer:
- the sink chunks (the first `sink_chunks`, e.g. the conditioning frame) stay exact and are never evicted;
- the newest `keep_recent_chunks` finished chunks stay exact;
- older chunks are compressed `span_chunks` at a time into a packed span, once, when they become final (a span is
  never re-compressed, so no drift);
- with `window_chunks`, a new chunk attends to the sink plus the last `window_chunks` chunks only; a span is freed
  when every chunk in it has left the window (its centroids are shared by all its chunks).
Keys are stored before the rotary embedding, with their absolute frame positions, and rotated on read.

Compression is pluggable: "none" (exact storage), "qvg" (`prq_compress`, k-means smoothing + progressive residual
quantization) and "kivi" (the peer: keys quantized per channel, values per token, asymmetric min/max, at the same bits).

Usage (the driver in `wan_autoregressive.py` does exactly this):
    cache = VideoKVCache(VideoKVConfig(compression="qvg", nbits=2))
    apply_qvg(transformer, cache)
    velocity = transformer(noisy_chunk, t, text)   # "denoise": attends to cached chunks + itself, writes nothing
    with cache.committing():
        transformer(clean_chunk, 0, text)          # "commit": writes the chunk's K/V, compresses final chunks
The chunk's frame position is the number of frames committed so far; its grid comes from the transformer's input.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..evaluation.memory import storage_bytes
from ..integrations.diffusers import (
    WanSelfAttentionProcessor,
    check_wan_transformer,
    restore_wan_self_attention_processors,
    set_wan_self_attention_processors,
    wan_apply_rotary,
    wan_rotary,
    watch_wan_input_grid,
)

__all__ = [
    "COMPRESSIONS", "ChunkInfo", "ExactCodec", "KIVICodec", "QVGCodec", "VideoKVAttnProcessor", "VideoKVCache",
    "VideoKVConfig", "apply_qvg", "make_codec", "remove_qvg", "video_kv_cache_of",
]

COMPRESSIONS = ("none", "qvg", "kivi")
_QUANT_BITS = (2, 3, 4, 8)  # what both codecs pack (kernels/quantize.py SUPPORTED_BITS, kernels/prq.py PRQ_BITS)


@dataclass
class VideoKVConfig:
    """Policy and codec of a `VideoKVCache`.

    block_size: channels per scale of the per-token residual (QVG) and of the per-token values (KIVI); None = 64
        when it divides the head dim, else the whole head dim.
    key_group_tokens: KIVI's per-channel key groups span up to this many tokens (the largest multiple of 8 that
        divides the span's token count).
    """

    compression: str = "qvg"
    nbits: int = 2
    sink_chunks: int = 1
    keep_recent_chunks: int = 1
    span_chunks: int = 1
    window_chunks: int | None = None
    block_size: int | None = None
    num_stages: int = 1
    num_centroids: int = 256
    kmeans_iters: int = 2
    asymmetric: bool = False
    key_group_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}.")
        if self.compression != "none" and self.nbits not in _QUANT_BITS:
            raise ValueError(
                f"nbits must be one of {_QUANT_BITS} for compression={self.compression!r}, got {self.nbits}."
            )
        for name in ("sink_chunks", "keep_recent_chunks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}.")
        if not isinstance(self.span_chunks, int) or self.span_chunks < 1:
            raise ValueError(f"span_chunks must be an int >= 1, got {self.span_chunks!r}.")
        if self.window_chunks is not None and (not isinstance(self.window_chunks, int) or self.window_chunks < 1):
            raise ValueError(f"window_chunks must be None or an int >= 1, got {self.window_chunks!r}.")
        if self.block_size is not None and (self.block_size <= 0 or self.block_size % 8):
            raise ValueError(f"block_size must be a positive multiple of 8, got {self.block_size}.")
        if self.key_group_tokens <= 0 or self.key_group_tokens % 8:
            raise ValueError(f"key_group_tokens must be a positive multiple of 8, got {self.key_group_tokens}.")
        if not 1 <= self.num_centroids <= 256:
            raise ValueError(f"num_centroids must be in [1, 256] (uint8 ids), got {self.num_centroids}.")
        if self.num_stages < 0 or self.kmeans_iters < 0:
            raise ValueError("num_stages and kmeans_iters must be >= 0.")

    def block_for(self, head_dim: int) -> int:
        if self.block_size is not None:
            return self.block_size
        return 64 if head_dim % 64 == 0 else head_dim


# ----------------------------------------------------------------------------------------------------------- codecs
# A codec turns one span's keys or values, (B, heads, N, D) pre-RoPE, into what the cache stores, and back.


class ExactCodec:
    """compression="none": the span is stored as it is (an owned copy), so the cache's logic runs unchanged."""

    name = "none"

    def check(self, num_tokens: int, head_dim: int) -> None:
        pass

    def encode(self, x: torch.Tensor, role: str, seed: int) -> torch.Tensor:
        return x.detach().clone(memory_format=torch.contiguous_format)

    def decode(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return packed.to(dtype)


@dataclass
class KIVIPacked:
    tensor: Any  # kernels.quantize.QuantizedTensor
    per_channel: bool  # keys: quantized along tokens (stored transposed, (B, heads, D, N))


class KIVICodec:
    """KIVI-style peer (Liu et al., arXiv 2402.02750): keys per channel (groups of tokens), values per token (groups
    of channels), asymmetric min/max with fp16 scale and minimum, through kernels/quantize.py's `quantize_pack`."""

    name = "kivi"

    def __init__(self, nbits: int, value_group: int | None, key_group_tokens: int):
        self.nbits, self.value_group, self.key_group_tokens = nbits, value_group, key_group_tokens

    def key_group(self, num_tokens: int) -> int:
        return max(g for g in range(8, min(num_tokens, self.key_group_tokens) + 1, 8) if num_tokens % g == 0)

    def check(self, num_tokens: int, head_dim: int) -> None:
        if num_tokens % 8:
            raise ValueError(f"KIVI packs keys along tokens: a span's token count must be a multiple of 8, got "
                             f"{num_tokens}.")
        group = self.value_group or head_dim
        if head_dim % group or group % 8:
            raise ValueError(f"KIVI value groups of {group} channels do not fit the head dim {head_dim}.")

    def encode(self, x: torch.Tensor, role: str, seed: int) -> KIVIPacked:
        from ..kernels.quantize import quantize_pack

        if role == "key":
            xt = x.detach().transpose(-1, -2)
            return KIVIPacked(quantize_pack(xt, self.nbits, self.key_group(x.shape[-2])), per_channel=True)
        return KIVIPacked(quantize_pack(x.detach(), self.nbits, self.value_group or x.shape[-1]), per_channel=False)

    def decode(self, packed: KIVIPacked, dtype: torch.dtype) -> torch.Tensor:
        from ..kernels.quantize import dequantize

        out = dequantize(packed.tensor, dtype)
        return out.transpose(-1, -2).contiguous() if packed.per_channel else out


class QVGCodec:
    """QVG: k-means smoothing + `num_stages` PRQ stages, then `nbits` per-token block quantization of the residual
    (quantizers/qvg_codec.py). Every (batch, head) row of a span is clustered on its own."""

    name = "qvg"

    def __init__(self, nbits, block_size, num_stages, num_centroids, kmeans_iters, asymmetric):
        self.kwargs = dict(nbits=nbits, num_stages=num_stages, num_centroids=num_centroids,
                           kmeans_iters=kmeans_iters, asymmetric=asymmetric)
        self.block_size = block_size

    def check(self, num_tokens: int, head_dim: int) -> None:
        block = self.block_size or head_dim
        if head_dim % 8 or head_dim % block:
            raise ValueError(f"QVG blocks of {block} channels do not fit the head dim {head_dim} (multiple of 8).")

    def encode(self, x: torch.Tensor, role: str, seed: int):
        from ..quantizers.qvg_codec import prq_compress

        return prq_compress(x.detach(), block_size=self.block_size or x.shape[-1], seed=seed, **self.kwargs)

    def decode(self, packed, dtype: torch.dtype) -> torch.Tensor:
        from ..quantizers.qvg_codec import prq_decompress

        return prq_decompress(packed, dtype)


def make_codec(config: VideoKVConfig, head_dim: int):
    if config.compression == "none":
        return ExactCodec()
    if config.compression == "kivi":
        return KIVICodec(config.nbits, config.block_for(head_dim), config.key_group_tokens)
    return QVGCodec(config.nbits, config.block_for(head_dim), config.num_stages, config.num_centroids,
                    config.kmeans_iters, config.asymmetric)


# ---------------------------------------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class ChunkInfo:
    """One committed chunk: its number, its first latent frame (absolute) and its (frames, height, width) patch grid."""

    index: int
    frame_offset: int
    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class ExactChunk:
    info: ChunkInfo
    key: torch.Tensor  # (B, heads, N, D), before the rotary embedding
    value: torch.Tensor


@dataclass
class PackedSpan:
    chunks: tuple[ChunkInfo, ...]
    key: Any  # codec payload of the span's keys (all its chunks' tokens, in order)
    value: Any


@dataclass
class VideoKVLayer:
    sink: list[ExactChunk] = field(default_factory=list)
    spans: list[PackedSpan] = field(default_factory=list)
    recent: list[ExactChunk] = field(default_factory=list)


class VideoKVCache:
    """Per-layer video KV storage (see the module docstring). `nbytes()` is the storage walk of the whole object."""

    def __init__(self, config: VideoKVConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("pass either a VideoKVConfig or keyword arguments, not both.")
        self.config = config if config is not None else VideoKVConfig(**kwargs)
        self.layers: dict[int, VideoKVLayer] = {}
        self.num_chunks = 0  # chunks committed so far (evicted ones included)
        self.next_frame = 0  # absolute latent frame (in patches) where the next chunk starts
        self.shape: tuple[int, int, int] | None = None  # (batch, heads, head_dim) fixed by the first commit
        self.dtype: torch.dtype | None = None  # of the stored exact K/V (the model's)
        self.mode = "denoise"
        self._grid: tuple[int, int, int] | None = None
        self._staged: dict[int, tuple[ChunkInfo, torch.Tensor, torch.Tensor]] = {}  # layer -> (chunk, K, V)
        self._codec = None

    # -- the chunk being processed ---------------------------------------------------------------------------------
    def observe_grid(self, grid: tuple[int, int, int]) -> None:
        """Called before every transformer forward with the input's patch grid (installed by `apply_qvg`)."""
        if min(grid) <= 0:
            raise ValueError(f"an empty chunk (grid of {grid} patches) cannot be denoised or committed.")
        if self.mode == "commit" and self._staged:
            raise RuntimeError("one transformer forward per commit: this chunk's K/V were already staged.")
        self._grid = tuple(grid)

    def current_chunk(self, num_tokens: int) -> ChunkInfo:
        if self._grid is None:
            raise RuntimeError("the cache has not seen the transformer's input grid: install it with apply_qvg().")
        info = ChunkInfo(self.num_chunks, self.next_frame, self._grid)
        if info.num_tokens != num_tokens:
            raise ValueError(f"the attention got {num_tokens} tokens but the input grid {self._grid} has "
                             f"{info.num_tokens}.")
        return info

    def check_compatible(self, key: torch.Tensor) -> None:
        """key: (B, S, heads, head_dim) of the current chunk."""
        b, _, h, d = key.shape
        if self.shape is not None and (b, h, d) != self.shape:
            raise ValueError(f"this chunk has (batch, heads, head_dim) = {(b, h, d)} but the cache holds "
                             f"{self.shape}; one cache serves one transformer and one batch.")

    # -- modes -------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def committing(self):
        """Within the block, one transformer forward on the denoised (clean) chunk writes its K/V.

        On a clean exit every layer's K/V are appended at once and chunks that became final are compressed; if the
        block raises, or ran no forward, nothing is written.
        """
        if self.mode == "commit":
            raise RuntimeError("committing() blocks do not nest.")
        self.mode, self._staged = "commit", {}
        try:
            yield self
            if not self._staged:
                raise ValueError("commit without a chunk: no transformer forward ran inside cache.committing().")
            self._apply_commit()
        finally:
            self.mode, self._staged = "denoise", {}

    def stage(self, layer_index: int, info: ChunkInfo, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep a layer's (B, S, heads, D) pre-RoPE key and value until the commit block ends."""
        if layer_index in self._staged:
            raise RuntimeError(f"layer {layer_index} was committed twice in one committing() block.")
        self._staged[layer_index] = (info, key.detach().transpose(1, 2).contiguous(),
                                     value.detach().transpose(1, 2).contiguous())

    def _apply_commit(self) -> None:
        cfg = self.config
        infos = {info for info, _, _ in self._staged.values()}
        if len(infos) != 1:
            raise RuntimeError(f"layers staged different chunks: {sorted(infos, key=repr)}.")
        info = infos.pop()
        if self.layers and set(self._staged) != set(self.layers):
            raise RuntimeError(f"layers {sorted(self._staged)} were committed but the cache holds layers "
                               f"{sorted(self.layers)}.")
        _, key0, _ = next(iter(self._staged.values()))
        batch, heads, _, head_dim = key0.shape
        codec = self._codec or make_codec(cfg, head_dim)
        # Check every span this commit will compress before changing anything.
        new_layers = {}
        for index, (_, key, value) in sorted(self._staged.items()):
            layer = self.layers.get(index, VideoKVLayer())
            sink, spans, recent = list(layer.sink), list(layer.spans), list(layer.recent)
            chunk = ExactChunk(info, key, value)
            (sink if info.index < cfg.sink_chunks else recent).append(chunk)
            # Chunks the next chunk no longer sees are dropped before compression (never compressed for nothing);
            # a span goes only when its last chunk has left the window.
            first_visible = self._first_visible(info.index + 1)
            recent = [c for c in recent if c.info.index >= first_visible]
            while len(recent) >= cfg.keep_recent_chunks + cfg.span_chunks:
                group, recent = recent[: cfg.span_chunks], recent[cfg.span_chunks :]
                spans.append(self._compress(codec, index, group))
            spans = [s for s in spans if s.chunks[-1].index >= first_visible]
            new_layers[index] = VideoKVLayer(sink, spans, recent)
        self.layers = new_layers
        self._codec = codec
        self.shape, self.dtype = (batch, heads, head_dim), key0.dtype
        self.num_chunks = info.index + 1
        self.next_frame = info.frame_offset + info.grid[0]

    def _compress(self, codec, layer_index: int, group: list[ExactChunk]) -> PackedSpan:
        key = torch.cat([c.key for c in group], dim=-2)
        value = torch.cat([c.value for c in group], dim=-2)
        codec.check(key.shape[-2], key.shape[-1])
        seed = (self.config.seed * 1009 + layer_index) * 100_003 + group[0].info.index
        return PackedSpan(tuple(c.info for c in group), codec.encode(key, "key", 2 * seed),
                          codec.encode(value, "value", 2 * seed + 1))

    def _first_visible(self, chunk_index: int) -> int:
        """Smallest non-sink chunk index that chunk `chunk_index` attends to."""
        if self.config.window_chunks is None:
            return 0
        return max(self.config.sink_chunks, chunk_index - self.config.window_chunks)

    # -- reads ------------------------------------------------------------------------------------------------------
    def read(self, layer_index: int, dtype: torch.dtype | None = None) -> list[ExactChunk]:
        """The chunks the next chunk attends to in this layer, decoded, in chunk order: (B, heads, N, D) pre-RoPE."""
        layer = self.layers.get(layer_index)
        if layer is None:
            if self.layers:
                raise KeyError(f"the cache holds layers {sorted(self.layers)}, not {layer_index}.")
            return []
        first_visible = self._first_visible(self.num_chunks)
        out = list(layer.sink)
        for span in layer.spans:
            dt = dtype or self.dtype
            key, value = self._codec.decode(span.key, dt), self._codec.decode(span.value, dt)
            start = 0
            for info in span.chunks:
                stop = start + info.num_tokens
                if info.index >= first_visible:
                    out.append(ExactChunk(info, key[..., start:stop, :], value[..., start:stop, :]))
                start = stop
        out.extend(c for c in layer.recent if c.info.index >= first_visible)
        return out

    def attended_chunks(self) -> list[int]:
        """Indices of the chunks the next chunk attends to (the same in every layer)."""
        return [c.info.index for c in self.read(min(self.layers))] if self.layers else []

    def held_chunks(self) -> dict[str, list[int]]:
        """Chunk indices held per part (of the first layer; every layer holds the same)."""
        layer = next(iter(self.layers.values()), VideoKVLayer())
        return {"sink": [c.info.index for c in layer.sink],
                "spans": [[i.index for i in s.chunks] for s in layer.spans],
                "recent": [c.info.index for c in layer.recent]}

    # -- memory ------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every storage the cache holds (the storage walk: views count at their storage's full size)."""
        return storage_bytes(self)

    def nbytes_by_part(self) -> dict[str, int]:
        """Storage walk of the exact sink chunks, the packed spans and the exact recent chunks, apart."""
        layers = list(self.layers.values())
        return {"sink": storage_bytes([x.sink for x in layers]), "spans": storage_bytes([x.spans for x in layers]),
                "recent": storage_bytes([x.recent for x in layers])}

    def num_tokens_held(self) -> dict[str, int]:
        """Tokens per part, summed over layers (bytes per token = nbytes_by_part / this)."""
        layers = list(self.layers.values())
        return {"sink": sum(c.info.num_tokens for x in layers for c in x.sink),
                "spans": sum(i.num_tokens for x in layers for s in x.spans for i in s.chunks),
                "recent": sum(c.info.num_tokens for x in layers for c in x.recent)}


# ------------------------------------------------------------------------------------------------------- processor


def _rotate_bhsd(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Wan's rotary on (B, heads, N, D) with (1, N, 1, D) tables."""
    cos, sin = (t.transpose(1, 2) for t in table)
    return wan_apply_rotary(x, (cos, sin))


class VideoKVAttnProcessor(WanSelfAttentionProcessor):
    """Wan self-attention over the cached chunks (keys rotated at their own frames) and the current chunk."""

    def __init__(self, layer_index: int, cache: VideoKVCache, transformer: Any):
        super().__init__(layer_index)
        self.cache = cache
        self._transformer = weakref.ref(transformer)

    def _rotary(self, info: ChunkInfo, like: torch.Tensor):
        cos, sin = wan_rotary(self._transformer(), *info.grid, frame_offset=info.frame_offset)
        return cos.to(like.device), sin.to(like.device)

    def attend(self, attn, query, key, value, rotary_emb, attention_mask):
        if attention_mask is not None:
            raise ValueError("VideoKVAttnProcessor builds its own attention pattern; got an attention_mask.")
        cache = self.cache
        if query.shape[1] == 0:
            raise ValueError("an empty chunk (0 tokens) cannot be denoised or committed.")
        info = cache.current_chunk(query.shape[1])
        cache.check_compatible(key)
        # Wan's own rotary numbers this input's frames from 0; the chunk really starts at info.frame_offset.
        table = self._rotary(info, query)
        q = _rotate_bhsd(query.transpose(1, 2), table)
        keys, values = [], []
        for chunk in cache.read(self.layer_index, dtype=key.dtype):
            keys.append(_rotate_bhsd(chunk.key, self._rotary(chunk.info, key)))
            values.append(chunk.value)
        keys.append(_rotate_bhsd(key.transpose(1, 2), table))
        values.append(value.transpose(1, 2))
        out = F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2))
        if cache.mode == "commit":
            cache.stage(self.layer_index, info, key, value)
        return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------------- install

_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_qvg(transformer: Any, cache: VideoKVCache) -> Any:
    """Install a `VideoKVAttnProcessor` reading/writing `cache` on every self-attention of a diffusers Wan
    transformer, and a pre-forward hook telling the cache each input's grid. Returns the transformer."""
    check_wan_transformer(transformer, "apply_qvg")
    if not isinstance(cache, VideoKVCache):
        raise TypeError(f"apply_qvg needs a VideoKVCache, got {type(cache).__name__}.")
    if transformer in _INSTALLED:
        raise RuntimeError("a video KV cache is already installed on this transformer; call remove_qvg() first.")
    previous = set_wan_self_attention_processors(
        transformer, lambda index: VideoKVAttnProcessor(index, cache, transformer)
    )
    handle = watch_wan_input_grid(transformer, cache.observe_grid)
    _INSTALLED[transformer] = (cache, previous, handle)
    return transformer


def remove_qvg(transformer: Any) -> VideoKVCache:
    """Put back the processors `apply_qvg` replaced and detach the hook; returns the cache (left as it is)."""
    if transformer not in _INSTALLED:
        raise RuntimeError("no video KV cache is installed on this transformer.")
    cache, previous, handle = _INSTALLED.pop(transformer)
    handle.remove()
    restore_wan_self_attention_processors(transformer, previous)
    return cache


def video_kv_cache_of(transformer: Any) -> VideoKVCache | None:
    """The cache `apply_qvg` installed on `transformer`, or None."""
    entry = _INSTALLED.get(transformer)
    return None if entry is None else entry[0]
