"""LOSA sparse prefix attention inside block-diffusion decoding, on a tiny random Llama (runs in seconds).

    python examples/losa.py

`register_losa()` registers the "losa" attention function (and its mask builder); `block_diffusion_generate(...,
losa=LosaConfig(...))` builds the per-sequence `LosaState`, passes it to every forward and marks the block
boundaries. Inside a block, only the few block tokens whose query moved most re-read the prefix, and only the
union of the QUEST pages they select; the others reuse their cached prefix output. Batch 1 and block diffusion
only, as the paper. On the real model see benchmarks/losa.py.
"""

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_fastslow.generation.block_diffusion import block_diffusion_generate
from hf_fastslow.integrations.caches import cache_kwargs
from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion
from hf_fastslow.modeling.losa import LosaConfig, LosaState, kv_density, register_losa

torch.set_num_threads(1)
torch.manual_seed(0)
MASK = 127
config = LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=144, num_hidden_layers=2,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024)  # SmolLM2's 9:3 GQA
model = attach_block_diffusion(LlamaForCausalLM(config).eval(), BlockDiffusionConfig(MASK, block_size=16))
prompt = torch.randint(3, 120, (1, 400))


def generate(losa=None):
    return model.generate(prompt, custom_generate=block_diffusion_generate, steps=4, max_new_tokens=48,
                          do_sample=False, eos_token_id=None, losa=losa)


dense = generate()
register_losa()
model.set_attn_implementation("losa")

# 1. Full budget with every block token active: exactly the dense decoder's tokens.
full = generate(LosaConfig(budget=512, page_size=16, active_k=16, min_prefix=0))
print("full budget, all tokens active == dense decoding:", torch.equal(full, dense))

# 2. A small budget: the protocol driven by hand to read the density counters afterwards.
losa = LosaConfig(budget=32, page_size=16, active_k=5, min_prefix=256)
state = LosaState(losa, model)
with torch.no_grad():
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, **cache_kwargs(model, cache), losa_state=state)  # prefill: dense, outside a block
    block = torch.full((1, 16), MASK)
    visible = torch.ones(1, 1, 16, 416, dtype=torch.bool)  # bidirectional block over the whole prefix
    state.start_block()
    for step in range(4):
        logits = model(input_ids=block, attention_mask=visible, **cache_kwargs(model, cache), losa_state=state).logits
        cache.crop(-16)  # the block's KV is not kept while it is denoised
        block[0, 4 * step:4 * step + 4] = logits[0, 4 * step:4 * step + 4].argmax(-1)
    state.end_block()
d = kv_density(state)
print(f"budget 32 of a 400-token prefix: LOSA loaded {100 * d['losa']:.1f}% of the prefix KV over the 4 steps "
      f"({100 * d['losa_sparse_steps']:.1f}% on steps 2-4, after the dense first step); QUEST-naive on the same "
      f"steps {100 * d['naive']:.1f}%")
print("with the decoder:", generate(losa)[0, 400:].tolist())
