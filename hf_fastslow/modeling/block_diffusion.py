"""Block-wise diffusion LMs on stock transformers models: the config stored on `model.config`, the 4D attention masks,
the cache that keeps the prefix and never persists a block until it is committed, and the mask token.

A block-diffusion LM writes its answer left to right in blocks of `block_size` tokens; inside a block it starts from
`[MASK]` tokens and fills them in a few parallel denoising passes that see the (cached) prefix plus the whole block.
No new model class is needed: every pattern is a 4D boolean `attention_mask` handed to the stock forward, and the
cache is a `DynamicCache` subclass. The decoding loop is `hf_fastslow.generation.block_diffusion`.

    bd = BlockDiffusionConfig(mask_token_id=ensure_mask_token(model, tok), block_size=4)
    attach_block_diffusion(model, bd)          # stored at model.config.block_diffusion; survives save/from_pretrained
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = [
    "additive_attention_mask",
    "ATTENTION_PATTERNS",
    "BlockDiffusionCache",
    "BlockDiffusionConfig",
    "attach_block_diffusion",
    "block_attention_mask",
    "block_diffusion_config",
    "ensure_mask_token",
    "model_attention_mask",
]

ATTENTION_PATTERNS = ("causal", "block", "bidirectional")
_CONFIG_ATTRIBUTE = "block_diffusion"


@dataclass
class BlockDiffusionConfig:
    """What a block-diffusion model is: its mask token, its block size, logit shift and attention pattern.

    Args:
        mask_token_id: the `[MASK]` id the masked slots hold.
        block_size: tokens per block (>= 1).
        logit_shift: True when the hidden state at position i predicts token i+1 (a converted AR model, I-DLM, Dream);
            False when it predicts token i itself (SDAR, TraDo, LLaDA).
        attention: inside a block, "causal" (I-DLM: token-causal everywhere), "block" (bidirectional inside a block,
            causal across blocks: BD3-LM, SDAR) or "bidirectional" (LLaDA, Dream: the whole sequence; with a prefix
            cache each block sees everything before it and itself).
    """

    mask_token_id: int
    block_size: int = 4
    logit_shift: bool = True
    attention: str = "block"

    def __post_init__(self):
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be an int >= 0, got {self.mask_token_id!r}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}.")
        if self.attention not in ATTENTION_PATTERNS:
            raise ValueError(f"attention must be one of {ATTENTION_PATTERNS}, got {self.attention!r}.")
        self.logit_shift = bool(self.logit_shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BlockDiffusionConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown BlockDiffusionConfig fields: {sorted(unknown)}")
        return cls(**d)


def _vocab_size(model) -> int:
    embeddings = model.get_input_embeddings()
    return int(embeddings.num_embeddings if embeddings is not None else model.config.vocab_size)


def attach_block_diffusion(model, config: BlockDiffusionConfig):
    """Store `config` on `model.config` (as a plain dict, so `save_pretrained`/`from_pretrained` round-trip it without
    `trust_remote_code`); no weight changes. Returns the model."""
    if not isinstance(config, BlockDiffusionConfig):
        raise TypeError(f"config must be a BlockDiffusionConfig, got {type(config).__name__}.")
    vocab = _vocab_size(model)
    if config.mask_token_id >= vocab:
        raise ValueError(
            f"mask_token_id {config.mask_token_id} is outside the model's vocabulary ({vocab} embeddings): add the "
            "token and resize the embeddings first (ensure_mask_token(model, tokenizer, strategy='add'))."
        )
    setattr(model.config, _CONFIG_ATTRIBUTE, config.to_dict())
    return model


def block_diffusion_config(model) -> BlockDiffusionConfig | None:
    """The `BlockDiffusionConfig` attached to `model` (or to a config object), None if there is none."""
    config = getattr(model, "config", model)
    stored = getattr(config, _CONFIG_ATTRIBUTE, None)
    if stored is None:
        return None
    if isinstance(stored, BlockDiffusionConfig):
        return stored
    return BlockDiffusionConfig.from_dict(dict(stored))


# --------------------------------------------------------------------------------------------------------------------
# Attention masks
# --------------------------------------------------------------------------------------------------------------------
def block_attention_mask(
    q_len: int,
    kv_len: int,
    block_size: int,
    *,
    q_offset: int,
    pattern: str,
    padding_mask: torch.Tensor | None = None,
    block_start: int = 0,
    device: torch.device | str | None = None,
) -> torch.BoolTensor:
    """`[B, 1, q_len, kv_len]` boolean mask (True = may attend) of a block-diffusion pass.

    Query i sits at absolute slot `q_offset + i` of the kv axis (the slots before it are the cached prefix). Slots
    before `block_start` are the prompt (read by one prefill pass); slot s >= block_start belongs to block
    `(s - block_start) // block_size`. Key k is visible to query q when
      - "causal": k <= q;
      - "block": k <= q, or both are generated slots of the same block (bidirectional inside a block, causal across;
        the prompt is causal, as the prefill that produced its cache);
      - "bidirectional": k's group <= q's group, the prompt being one group before block 0 (a LLaDA/Dream model under a
        prefix cache: each block sees everything before it and itself; pass `block_size >= kv_len` and
        `block_start=0` for the uncached whole-sequence mask).
    `padding_mask` `[B, kv_len]` (1 = real token) hides padded keys; a padded query sees only its own slot, so no row is
    empty (no NaN); its output is never read. B is 1 without `padding_mask`.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if pattern not in ATTENTION_PATTERNS:
        raise ValueError(f"pattern must be one of {ATTENTION_PATTERNS}, got {pattern!r}.")
    if q_offset < 0 or q_offset + q_len > kv_len:
        raise ValueError(f"queries at slots {q_offset}..{q_offset + q_len - 1} do not fit in {kv_len} key slots.")
    if padding_mask is not None:
        device = padding_mask.device
        if padding_mask.dim() != 2 or padding_mask.shape[1] != kv_len:
            raise ValueError(f"padding_mask must be [B, {kv_len}], got {tuple(padding_mask.shape)}.")
    q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    if pattern == "causal":
        allowed = k <= q
    else:
        # Generated slots: their block index; prompt slots: -1 (one group) for "bidirectional", so the comparison
        # below lets the whole prompt see itself; "block" keeps the prompt causal with an explicit `k <= q`.
        q_group = torch.where(q >= block_start, torch.div(q - block_start, block_size, rounding_mode="floor"), -1)
        k_group = torch.where(k >= block_start, torch.div(k - block_start, block_size, rounding_mode="floor"), -1)
        if pattern == "block":
            allowed = (k <= q) | ((q_group == k_group) & (q_group >= 0))
        else:
            allowed = k_group <= q_group
    allowed = allowed[None, None]
    if padding_mask is None:
        return allowed
    real = padding_mask.bool()
    allowed = allowed & real[:, None, None, :]
    own_slot = (k == q)[None, None]
    query_is_pad = ~real[:, q_offset : q_offset + q_len][:, None, :, None]
    return torch.where(query_is_pad, own_slot, allowed)


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive float mask every attention backend accepts (eager adds it to the scores; a bool
    4D mask would be added as 0/1 there). 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def model_attention_mask(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask `model` takes for the boolean `allowed`: the boolean itself for SDPA, flex and registered functions
    (LOSA), an additive float mask (0 / dtype min) for eager attention, which adds the mask to its scores. Flash
    attention takes no arbitrary 4D mask: refused."""
    from hf_fastslow.integrations.attention import attention_implementation

    impl = str(attention_implementation(model) or "eager")
    if "flash" in impl:
        raise ValueError(
            f"block diffusion needs arbitrary 4D attention masks, which attn_implementation={impl!r} does not take: "
            "load the model with attn_implementation='sdpa' (or 'eager')."
        )
    if impl == "eager" or impl.endswith("_eager"):
        return additive_attention_mask(allowed, dtype)
    return allowed


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------
class BlockDiffusionCache(DynamicCache):
    """A `DynamicCache` whose passes see `cat(prefix, new)` but store nothing unless inside `with cache.committing():`.

    Denoising passes over a block read the cached prefix and the block's fresh keys/values and leave the cache as it
    was; the pass that feeds the block's final tokens runs under `committing()` and appends them. The switch is an
    attribute, not a forward kwarg: transformers 5.17 does not forward model kwargs into `Cache.update`. Only full
    attention layers (`DynamicLayer`) are supported (a sliding window would drop prefix keys the mask still counts).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.persist = True  # ordinary DynamicCache behaviour until a decoder switches it off
        self.keep: int | None = None  # while committing: store only the first `keep` new tokens (None: all)

    @classmethod
    def from_cache(cls, cache: DynamicCache | None) -> BlockDiffusionCache:
        """A BlockDiffusionCache over `cache`'s layers (shared: committing extends them as `generate` extends its
        cache); a fresh one for None."""
        if isinstance(cache, cls):
            return cache
        new = cls()
        if cache is None:
            return new
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"block diffusion needs a DynamicCache, got a {type(cache).__name__}.")
        new.layers = cache.layers
        new.layer_class_to_replicate = cache.layer_class_to_replicate
        new.offloading = getattr(cache, "offloading", False)
        return new

    def check_supported(self) -> None:
        bad = [type(layer).__name__ for layer in self.layers if type(layer) is not DynamicLayer]
        if bad or self.offloading:
            raise ValueError(
                "BlockDiffusionCache supports full-attention DynamicLayers without offloading only, got "
                f"{bad or 'an offloading cache'}."
            )

    @contextlib.contextmanager
    def committing(self, keep: int | None = None):
        """Passes run inside this block store their keys/values (the KV-commit pass of a finished block). With `keep`,
        only the first `keep` new tokens are stored and the rest are seen but not kept: one forward that commits a
        block and runs the next block's first denoising step."""
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}.")
        previous = (self.persist, self.keep)
        self.persist, self.keep = True, keep
        try:
            yield self
        finally:
            self.persist, self.keep = previous

    @contextlib.contextmanager
    def peeking(self):
        """Passes run inside this block read the cache and store nothing (the denoising passes)."""
        previous = (self.persist, self.keep)
        self.persist, self.keep = False, None
        try:
            yield self
        finally:
            self.persist, self.keep = previous

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.persist and self.keep is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.persist:
            keep = self.keep
            keys, values = super().update(key_states[..., :keep, :], value_states[..., :keep, :], layer_idx, *args,
                                          **kwargs)
            return (torch.cat([keys, key_states[..., keep:, :]], dim=-2),
                    torch.cat([values, value_states[..., keep:, :]], dim=-2))
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx]
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


# --------------------------------------------------------------------------------------------------------------------
# Mask token
# --------------------------------------------------------------------------------------------------------------------
_MASK_NAMES = ("<|mask|>", "<mask>", "[MASK]", "<|MASK|>", "<|mdm_mask|>")


def _reusable_special_id(tokenizer) -> int | None:
    """The highest-id added special token that the tokenizer never emits on its own: not bos/eos/pad/unk/sep/cls and
    not written by the chat template."""
    reserved = {
        getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk", "sep", "cls")
    } - {None}
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    candidates = [
        i for i, tok in decoder.items()
        if getattr(tok, "special", False) and i not in reserved and str(tok) not in template
    ]
    return max(candidates) if candidates else None


def ensure_mask_token(model, tokenizer, strategy: str = "reuse", token: str = "<|mask|>") -> int:
    """The `[MASK]` id for `model`/`tokenizer`, creating it when needed; sets `tokenizer.mask_token`.

    An existing mask token (the tokenizer's `mask_token`, or `token`/a usual mask name already in the vocabulary) is
    always kept. Otherwise:
      - "reuse" (default): the highest-id added special token that is not bos/eos/pad/unk and not written by the chat
        template becomes the mask. No resize: the vocabulary, the tied embedding/head matrix and the checkpoint shape
        stay stock. For SmolLM2-135M-Instruct that is `<empty_output>` (id 16). Why this is the default there: ids
        7-16 (`<filename>` ... `<empty_output>`) have near-identical embedding rows (max |diff| 0.008, every norm
        3.2937 while trained rows vary), i.e. they never received a gradient, so the reused row carries no meaning,
        as a fresh row would not either; nothing is resized, so a converted checkpoint keeps vocab 49152 (a multiple
        of 64; a new token makes it 49153) and loads into a stock LlamaForCausalLM with the stock tokenizer. As an
        output the reused row is as inert as a mean-resized one (on 256 tokens of the bundled text: median rank
        48,196 of 49,152, max probability 2.9e-7, vs rank 25,031, 3.2e-7 for a mean row), and the decoder never
        picks the mask id anyway.
      - "add": add `token` as a special token and `resize_token_embeddings(len(tokenizer), mean_resizing=True)`
        (the new input/output row is the mean of the others). Use it for tokenizers without an unused special token.
    """
    if strategy not in ("reuse", "add"):
        raise ValueError(f"strategy must be 'reuse' or 'add', got {strategy!r}.")
    vocab = _vocab_size(model)
    existing = getattr(tokenizer, "mask_token_id", None)
    if existing is None:
        unk = getattr(tokenizer, "unk_token_id", None)
        for name in (token, *_MASK_NAMES):
            found = tokenizer.convert_tokens_to_ids(name)
            if isinstance(found, int) and found != unk and found is not None:
                existing = found
                break
    if existing is not None and existing < vocab:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(existing)
        return int(existing)
    if strategy == "reuse":
        reused = _reusable_special_id(tokenizer)
        if reused is None or reused >= vocab:
            raise ValueError(
                f"{type(tokenizer).__name__} has no unused special token to reuse as the mask: call "
                "ensure_mask_token(model, tokenizer, strategy='add')."
            )
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(reused)
        return int(reused)
    tokenizer.add_special_tokens({"mask_token": token})
    mask_id = int(tokenizer.convert_tokens_to_ids(token))
    if mask_id >= vocab:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return mask_id
