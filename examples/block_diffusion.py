"""Block-diffusion decoding on a tiny random Llama (runs in seconds, no download).

    python examples/block_diffusion.py

A block-diffusion LM writes blocks of `block_size` [MASK] slots and fills each block in a few parallel denoising
forwards over the cached prefix + the block; `threshold` commits every slot whose confidence passes it. The model here
is random (not a trained DLM), so the text is noise: the example shows the API, the tokens-per-forward counter, that
block_size=1 reduces to greedy `generate`, and that the config survives save_pretrained/from_pretrained.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fastslow.generation.block_diffusion import block_diffusion_generate
from hf_fastslow.generation.padding import left_pad
from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, block_diffusion_config

torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
model = LlamaForCausalLM(config).eval()
# Mask id 127; shifted logits (hidden i predicts token i+1, as the AR head it came from); "block" attention:
# bidirectional inside a block, causal across blocks.
attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=127, block_size=4, logit_shift=True,
                                                   attention="block"))

ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=0)  # a left-padded batch
# A random model spreads its probability thin (top-1 about 1/vocab = 0.008-0.012 here), so the confidence threshold
# that lets several slots through in one forward sits at 0.0105; a trained DLM uses about 0.9.
for steps, threshold in [(4, None), (4, 0.0105), (2, None)]:
    out = model.generate(ids, attention_mask=mask, custom_generate=block_diffusion_generate, steps=steps,
                         threshold=threshold, max_new_tokens=10, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True)
    tpf = [round(x, 2) for x in out.tokens_per_forward.tolist()]
    print(f"block 4, steps {steps}, threshold {threshold}: new tokens {out.sequences[:, ids.shape[1]:].tolist()}, "
          f"tokens per forward {tpf}")

# block_size=1, one step, causal attention: the loop is plain greedy decoding.
attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=127, block_size=1, attention="causal"))
greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
same = model.generate(ids, attention_mask=mask, custom_generate=block_diffusion_generate, max_new_tokens=10,
                      do_sample=False)
print(f"block_size=1 equals greedy generate: {torch.equal(greedy, same)}")

with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    reloaded = LlamaForCausalLM.from_pretrained(path)
    print(f"config after save/from_pretrained: {block_diffusion_config(reloaded)}")
