"""speculative_generate and the cache: a cache that already holds part of the prompt, the batched cache's holes
compacted, position ids of left-padded rows (on models that react to a shift)."""

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow import cache_kwargs
from hf_fastslow.generation import speculative_generate
from tests.conftest import tiny_llama
from tests.generation.speculative_helpers import (
    AlternatingDrafter,
    EmptyDrafter,
    OracleDrafter,
    _batch,
    _position_sensitive_llama,
    _unpadded,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# --- a cache that already holds part of the prompt -------------------------------------------------------------------
def _cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@pytest.mark.parametrize("kind", ["empty", "partial"])
def test_multi_turn_cache_reuse_batch1(kind):
    """Turn 2 of a conversation with the cache left by turn 1: only the new tokens are fed, same text as generate."""
    import copy

    model = _position_sensitive_llama()
    ids, _ = _batch(rows=1)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None}
    ref1 = model.generate(ids, return_dict_in_generate=True, **kwargs, **cache_kwargs(model, DynamicCache()))
    ref_cache = _cache_of(ref1)
    turn2 = torch.cat([ref1.sequences, torch.tensor([[5, 17, 33, 9]])], dim=1)
    ref2 = model.generate(turn2, **kwargs, **cache_kwargs(model, copy.deepcopy(ref_cache)))

    def drafter(reference):
        return EmptyDrafter(3) if kind == "empty" else OracleDrafter(_unpadded(reference, torch.ones_like(ids)),
                                                                     k=3, corrupt=0.3)

    cache = DynamicCache()
    out1 = model.generate(ids, custom_generate=speculative_generate, drafter=drafter(ref1.sequences), **kwargs,
                          **cache_kwargs(model, cache))
    assert torch.equal(out1, ref1.sequences)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == out1.shape[1] - 1
    calls, handle = _count_tokens_fed(model)
    try:
        out2 = model.generate(turn2, custom_generate=speculative_generate, drafter=drafter(ref2), **kwargs,
                              **cache_kwargs(model, cache))
    finally:
        handle.remove()
    assert torch.equal(out2, ref2)
    assert calls[0] == turn2.shape[1] - out1.shape[1] + 1  # the prefill fed the uncached tail only


def _count_tokens_fed(model):
    fed = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                              else args[0]).shape[1]),
        with_kwargs=True,
    )
    return fed, handle


@pytest.mark.parametrize("rows", [1, 3])
def test_prefilled_prompt_cache_left_padded(rows):
    """A prompt cache (shared prefix computed once, deep-copied per call) + a suffix: same tokens as generate (on a
    model that notices positions off by the padding)."""
    import copy

    model = _position_sensitive_llama()
    prefix, prefix_mask = _batch(rows=rows, width=9)
    suffix = torch.randint(3, 128, (rows, 5), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([prefix, suffix], dim=1)
    mask = torch.cat([prefix_mask, torch.ones_like(suffix)], dim=1)
    prompt_cache = DynamicCache()
    with torch.no_grad():
        model(prefix, attention_mask=prefix_mask, position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
              use_cache=True, **cache_kwargs(model, prompt_cache))
    kwargs = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False}
    ref = model.generate(ids, **kwargs, **cache_kwargs(model, copy.deepcopy(prompt_cache)))
    for drafter in (EmptyDrafter(3), OracleDrafter(_unpadded(ref, mask), k=3, corrupt=0.3)):
        fed, handle = _count_tokens_fed(model)
        try:
            out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, **kwargs,
                                 **cache_kwargs(model, copy.deepcopy(prompt_cache)))
        finally:
            handle.remove()
        assert torch.equal(out, ref)
        assert fed[0] == suffix.shape[1]
    with pytest.raises(ValueError, match="already holds"):
        model.generate(prefix, attention_mask=prefix_mask, custom_generate=speculative_generate,
                       drafter=EmptyDrafter(3), max_new_tokens=4, **cache_kwargs(model, copy.deepcopy(prompt_cache)))


# --- the batched cache: holes are compacted ---------------------------------------------------------------------------
@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 5)])
def test_batched_cache_is_compacted(model, pads):
    ids, mask = _batch(rows=3, pads=pads)
    n, k = 60, 6
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)
    cache = DynamicCache()
    drafter = AlternatingDrafter(_unpadded(ref, mask), k=k)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         custom_generate=speculative_generate, drafter=drafter, **cache_kwargs(model, cache))
    assert torch.equal(out, ref)
    stats = drafter.last_stats
    # Without compaction every round adds the leader's k + 1 columns: far more than any row holds.
    uncompacted = ids.shape[1] + (stats.target_forwards - 1) * (k + 1)
    longest_row = ids.shape[1] - min(pads) + n - 1  # tokens in the cache: the last one is never fed
    assert uncompacted > longest_row + 40
    assert cache.get_seq_length() <= longest_row + 16 + (k + 1)


# --- position ids of left-padded rows: tested on models that react to a shift ----------------------------------------
def _greedy_with_generated_positions_shifted(model, ids, mask, shift, steps):
    """Plain greedy decoding by hand where row i's generated tokens get positions `shift[i]` too high."""
    cache, positions = DynamicCache(), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache)).logits
        token, pos, out = logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1 + shift[:, None], [ids]
        for _ in range(steps - 1):
            out.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            logits = model(token, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache)).logits
            token, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
        return torch.cat(out + [token], 1)


def test_left_padded_positions_on_a_position_sensitive_model():
    model = _position_sensitive_llama()
    ids, mask = _batch(rows=3, pads=(0, 3, 5))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    # The model has the power to see the bug: shifting the padded rows' generated positions changes their text.
    shifted = _greedy_with_generated_positions_shifted(model, ids, mask, torch.tensor([0, 3, 5]), 30)
    assert not torch.equal(shifted[1], ref[1]) and not torch.equal(shifted[2], ref[2])
    for drafter in (OracleDrafter(_unpadded(ref, mask), k=4, corrupt=0.3), OracleDrafter(_unpadded(ref, mask), k=3),
                    EmptyDrafter(2)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                             custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref), type(drafter).__name__


def test_left_padded_positions_on_the_default_model(default_model):
    """SmolLM2-135M, three chat prompts left-padded by different amounts, drafts partly wrong: same tokens as
    generate."""
    model, tok = default_model
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Name a color.", "List three prime numbers, please.", "Write one sentence about the sea and ships.")
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    pads = (enc["attention_mask"] == 0).sum(1).tolist()
    assert len(set(pads)) == 3 and max(pads) >= 3
    kwargs = {**enc, "max_new_tokens": 16, "do_sample": False}
    ref = model.generate(**kwargs)
    drafter = OracleDrafter(_unpadded(ref, enc["attention_mask"]), k=4, corrupt=0.3, vocab=model.config.vocab_size)
    out = model.generate(**kwargs, custom_generate=speculative_generate, drafter=drafter)
    assert torch.equal(out, ref)
    assert drafter.last_stats.accepted > 0 and drafter.last_stats.target_forwards < 16
