"""Shared pieces of the CREST tests: a byte tokenizer that also has a one-token "\\n\\n" (so both boundary rules
occur), calibration traces with both kinds of steps, and one-step decode logits through a cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hf_fastslow.integrations import cache_kwargs
from tests.conftest import byte_tokenizer, tiny_llama

TRACES = [
    ("<user>What is 2+2?\n<assistant>", "Add the numbers.\n\nWait, let me check it again.\n\nSo it is 4.\n\nDone."),
    ("<user>What is 3*3?\n<assistant>", "Multiply.\n\nThe product is 9.\n\nHmm, verify: 3+3+3 = 9.\n\nok"),
    "First add.\n\nThen multiply.\n\nAlternatively, count them.\n\nThe answer is 6.",
    "Read the question.\n\nWrite the sum.\n\nWait, that is wrong.\n\nFix the sum.\n\nAnswer 5.",
    "Step one.\n\nStep two.\n\nStep three.\n\nDouble-check step two.\n\nEnd.",
]
LINEAR_TRACES = ["Add.\n\nThen subtract.\n\nThe answer is 3.", "One step.\n\nAnother step.\n\nDone."]


def crest_tokenizer():
    """The byte tokenizer plus "\\n\\n" as one added token (id 259): vocabulary 260."""
    tok = byte_tokenizer()
    tok.add_tokens(["\n\n"])
    return tok


def crest_model(**kw):
    return tiny_llama(vocab=260, **kw)


def step_logits(model, prefix: torch.Tensor, attention_mask: torch.Tensor, next_ids: torch.Tensor):
    """(prefill logits, logits of one decode step on `next_ids` [B]) through a DynamicCache, as `generate` runs."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        pre = model(input_ids=prefix, attention_mask=attention_mask, use_cache=True, **cache_kwargs(model, cache))
        mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        step = model(input_ids=next_ids[:, None], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    return pre.logits, step.logits[:, -1]


def hook_counts(model) -> int:
    """Every forward hook and pre-hook registered anywhere in `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
