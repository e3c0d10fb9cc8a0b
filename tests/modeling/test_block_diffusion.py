"""Block-diffusion core: config round-trip, the 4D masks against an element-by-element reference, staircase equivalence
(cached block pass == full recompute of the masked sequence), the cache's commit invariants, the mask token."""

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from hf_fastslow.integrations.caches import cache_kwargs
from hf_fastslow.modeling.block_diffusion import (
    ATTENTION_PATTERNS,
    BlockDiffusionCache,
    BlockDiffusionConfig,
    attach_block_diffusion,
    block_attention_mask,
    block_diffusion_config,
    ensure_mask_token,
    model_attention_mask,
)
from tests.conftest import byte_tokenizer, tiny_llama


# ---- config --------------------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = BlockDiffusionConfig(mask_token_id=127, block_size=8, logit_shift=False, attention="bidirectional")
    assert BlockDiffusionConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(mask_token_id=-1), dict(mask_token_id=1, block_size=0), dict(mask_token_id=1, attention="x"),
                dict(mask_token_id=1, block_size=2.0)):
        with pytest.raises(ValueError):
            BlockDiffusionConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        BlockDiffusionConfig.from_dict({"mask_token_id": 1, "typo": 2})


def test_attach_survives_save_and_reload(tmp_path):
    model = tiny_llama(num_layers=1)
    assert block_diffusion_config(model) is None
    cfg = BlockDiffusionConfig(mask_token_id=127, block_size=4, attention="causal")
    attach_block_diffusion(model, cfg)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert block_diffusion_config(reloaded) == cfg
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=128))
    assert block_diffusion_config(model) == cfg  # the refused call changed nothing


# ---- masks ---------------------------------------------------------------------------------------------------------
def reference_allowed(q, k, block_size, pattern, block_start, real_q, real_k):
    """One element of the mask, written out from the docstring's rules."""
    if not real_q:
        return k == q
    if not real_k:
        return False
    if pattern == "causal":
        return k <= q
    q_gen, k_gen = q >= block_start, k >= block_start
    q_block = (q - block_start) // block_size if q_gen else -1
    k_block = (k - block_start) // block_size if k_gen else -1
    if pattern == "block":
        return k <= q or (q_gen and k_gen and q_block == k_block)
    return k_block <= q_block


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS)
def test_mask_matches_elementwise_reference(block_size, pattern):
    kv_len = 11  # divisible by none of the block sizes but 1
    padding = torch.ones(3, kv_len, dtype=torch.long)
    padding[1, :2] = 0
    padding[2, :5] = 0
    for q_offset, q_len, block_start in [(0, 11, 0), (0, 11, 3), (7, 4, 7), (5, 6, 2), (10, 1, 10)]:
        for pad in (None, padding):
            mask = block_attention_mask(q_len, kv_len, block_size, q_offset=q_offset, pattern=pattern,
                                        padding_mask=pad, block_start=block_start)
            rows = 1 if pad is None else 3
            assert mask.shape == (rows, 1, q_len, kv_len) and mask.dtype == torch.bool
            for b in range(rows):
                for i in range(q_len):
                    q = q_offset + i
                    for k in range(kv_len):
                        real_q = pad is None or bool(pad[b, q])
                        real_k = pad is None or bool(pad[b, k])
                        want = reference_allowed(q, k, block_size, pattern, block_start, real_q, real_k)
                        assert bool(mask[b, 0, i, k]) == want, (b, q, k, q_offset, block_start)


def test_mask_rejects_bad_arguments():
    with pytest.raises(ValueError):
        block_attention_mask(2, 4, 0, q_offset=2, pattern="block")
    with pytest.raises(ValueError):
        block_attention_mask(2, 4, 2, q_offset=3, pattern="block")
    with pytest.raises(ValueError):
        block_attention_mask(2, 4, 2, q_offset=2, pattern="sideways")
    with pytest.raises(ValueError):
        block_attention_mask(2, 4, 2, q_offset=2, pattern="block", padding_mask=torch.ones(1, 3))


def test_eager_gets_an_additive_mask_and_flash_is_refused():
    model = tiny_llama(num_layers=1, attn_implementation="eager")
    allowed = block_attention_mask(3, 5, 2, q_offset=2, pattern="causal")
    additive = model_attention_mask(model, allowed, torch.float32)
    assert additive.dtype == torch.float32 and bool((additive[allowed] == 0).all())
    assert bool((additive[~allowed] == torch.finfo(torch.float32).min).all())
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4D attention masks"):
        model_attention_mask(model, allowed, torch.float32)


# ---- staircase equivalence -----------------------------------------------------------------------------------------
def _forward(model, ids, positions, allowed, cache=None):
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    mask = model_attention_mask(model, allowed, torch.float32)
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=cache is not None,
                 **kwargs).logits


@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_block_passes_equal_full_recompute(pattern, attn):
    """Decoding block k with the prefix in a BlockDiffusionCache == recomputing the whole masked sequence."""
    model = tiny_llama(num_layers=2, attn_implementation=attn)
    block, prompt_width = 3, 5
    rows = torch.randint(3, 120, (2, prompt_width + 3 * block - 1))  # last block partial
    padding = torch.ones_like(rows)
    padding[1, :2] = 0  # a left-padded row
    length = rows.shape[1]
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    full = _forward(model, rows, positions, block_attention_mask(
        length, length, block, q_offset=0, pattern=pattern, padding_mask=padding, block_start=prompt_width))

    cache = BlockDiffusionCache()
    with cache.committing():
        _forward(model, rows[:, :prompt_width], positions[:, :prompt_width], block_attention_mask(
            prompt_width, prompt_width, block, q_offset=0, pattern=pattern, padding_mask=padding[:, :prompt_width],
            block_start=prompt_width), cache)
    assert cache.get_seq_length() == prompt_width
    start = prompt_width
    while start < length:
        end = min(start + block, length)
        allowed = block_attention_mask(end - start, end, block, q_offset=start, pattern=pattern,
                                       padding_mask=padding[:, :end], block_start=prompt_width)
        with cache.peeking():
            for _ in range(2):  # denoising passes leave the cache as it was
                logits = _forward(model, rows[:, start:end], positions[:, start:end], allowed, cache)
                assert cache.get_seq_length() == start
        torch.testing.assert_close(logits, full[:, start:end], atol=1e-5, rtol=1e-5)
        with cache.committing():
            _forward(model, rows[:, start:end], positions[:, start:end], allowed, cache)
        assert cache.get_seq_length() == end  # +block after the commit pass
        start = end


@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS)
def test_future_affects_past_only_where_allowed(pattern):
    model = tiny_llama(num_layers=2)
    block, prompt_width, length = 4, 3, 11  # blocks [3..6], [7..10]
    ids = torch.randint(3, 120, (1, length))
    positions = torch.arange(length)[None]
    allowed = block_attention_mask(length, length, block, q_offset=0, pattern=pattern, block_start=prompt_width)
    base = _forward(model, ids, positions, allowed)
    changed_at = 5  # a slot inside the first block
    other = ids.clone()
    other[0, changed_at] = (other[0, changed_at] + 1) % 120 + 3
    moved = (_forward(model, other, positions, allowed) - base).abs().amax(-1)[0] > 1e-6
    earlier_in_block = moved[prompt_width:changed_at]
    assert not bool(moved[:prompt_width].any())  # the prompt never sees the answer
    if pattern == "causal":
        assert not bool(earlier_in_block.any())
    else:
        assert bool(earlier_in_block.all())  # in-block bidirection: the future changes the past
    assert bool(moved[changed_at:].all())


# ---- the cache -----------------------------------------------------------------------------------------------------
def test_cache_update_without_kwargs_stores_only_when_committing():
    """The commit switch is an attribute: transformers 5.17 calls `update(k, v, layer_idx)` without model kwargs."""
    cache = BlockDiffusionCache()
    k = torch.randn(1, 2, 3, 4)
    with cache.committing():
        cache.update(k, k, 0)
    with cache.peeking():
        keys, values = cache.update(k[:, :, :2], k[:, :, :2], 0)
        assert keys.shape[2] == 5 and cache.get_seq_length() == 3
        torch.testing.assert_close(keys[:, :, 3:], k[:, :, :2])
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)  # outside any block: an ordinary DynamicCache
    assert cache.get_seq_length() == 4 and keys.shape[2] == 4
    with cache.committing(keep=1):  # a fused commit: the first new token is stored, the rest only seen
        keys, _ = cache.update(k, k, 0)
        assert keys.shape[2] == 7 and cache.get_seq_length() == 5
        torch.testing.assert_close(keys[:, :, 4:], k)
    with cache.peeking():
        fresh_keys, _ = cache.update(k, k, 1)  # a layer with no prefix yet: no concatenation, nothing stored
        assert fresh_keys is k and cache.layers[1].keys is None or cache.layers[1].keys.numel() == 0


def test_from_cache_shares_the_callers_layers():
    user = DynamicCache()
    user.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    cache = BlockDiffusionCache.from_cache(user)
    with cache.committing():
        cache.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), 0)
    assert user.get_seq_length() == 5  # extended like `generate` extends a cache it was handed
    assert BlockDiffusionCache.from_cache(cache) is cache
    with pytest.raises(ValueError):
        BlockDiffusionCache.from_cache(object())


# ---- mask token ----------------------------------------------------------------------------------------------------
def test_ensure_mask_token_add_resizes_with_mean_rows():
    tok = byte_tokenizer()
    model = tiny_llama(num_layers=1, vocab=259)
    with pytest.raises(ValueError, match="no unused special token"):
        ensure_mask_token(model, tok, strategy="reuse")
    assert model.get_input_embeddings().num_embeddings == 259  # the refused call changed nothing
    mean_row = model.get_input_embeddings().weight.mean(0)
    mask_id = ensure_mask_token(model, tok, strategy="add")
    assert mask_id == 259 and tok.mask_token == "<|mask|>"
    assert model.get_input_embeddings().num_embeddings == 260
    torch.testing.assert_close(model.get_input_embeddings().weight[259], mean_row, atol=1e-5, rtol=1e-4)
    assert ensure_mask_token(model, tok, strategy="add") == 259  # idempotent: an existing mask token is kept
    with pytest.raises(ValueError):
        ensure_mask_token(model, tok, strategy="other")


def test_ensure_mask_token_reuse_picks_an_unused_special():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<unused_a>", "<unused_b>"]})
    model = tiny_llama(num_layers=1, vocab=len(tok))
    weights = model.get_input_embeddings().weight.clone()
    mask_id = ensure_mask_token(model, tok)
    assert mask_id == tok.convert_tokens_to_ids("<unused_b>") and tok.mask_token_id == mask_id
    assert torch.equal(model.get_input_embeddings().weight, weights)  # no resize, no weight change


@pytest.mark.slow
def test_smollm2_reuses_empty_output(default_model):
    model, tok = default_model
    assert ensure_mask_token(model, tok) == 16 and tok.mask_token == "<empty_output>"
    assert model.get_input_embeddings().num_embeddings == 49152
