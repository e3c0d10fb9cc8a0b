"""I-DLM introspective strided decoding (ISD) and lossless R-ISD on a tiny random Llama, in seconds.

    python examples/isd.py

One forward per round verifies the drafts of the last round and drafts N-1 new tokens at appended mask slots. Greedy
ISD returns exactly what greedy `generate` returns for ANY causal LM; what an I-DLM-trained model adds is acceptance
(tokens per forward > 1). This model's weights are random, so its mask slots draft badly and tokens per forward stays
near 1: the point here is the API and the exactness. R-ISD puts a peft activated LoRA on the mask slots only, so
the verifier is the base model bit for bit.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fastslow.generation.isd import introspective_acceptance_rate, isd_generate

torch.set_num_threads(1)
torch.manual_seed(0)
MASK = 127  # the mask token: an id the model never needs to emit (a real I-DLM adds a <|mask|> special token)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
model = LlamaForCausalLM(config).eval().double()  # float64: no near-tie argmax flips between query lengths

# A left-padded batch of three prompts.
ids = torch.randint(3, 120, (3, 8))
mask = torch.ones_like(ids)
mask[0, :3] = mask[1, :1] = 0
ids[mask == 0] = 0

plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
for n in (2, 3, 4):
    out = model.generate(ids, attention_mask=mask, custom_generate=isd_generate, gen_block_size=n, mask_token_id=MASK,
                         max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    print(f"ISD greedy N={n}: same tokens as generate: {torch.equal(out.sequences, plain)}; tokens per forward "
          f"{[round(v, 2) for v in out.tokens_per_forward.tolist()]}, acceptance "
          f"{[round(v, 2) for v in out.acceptance_rate.tolist()]}")

# Sampling: speculative-sampling acceptance, so the tokens follow the model's own distribution (tested by chi-square).
out = model.generate(ids, attention_mask=mask, custom_generate=isd_generate, gen_block_size=3, mask_token_id=MASK,
                     do_sample=True, temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=24,
                     return_dict_in_generate=True)
print(f"ISD sampling N=3: tokens per forward {[round(v, 2) for v in out.tokens_per_forward.tolist()]}, "
      f"acceptance {[round(v, 2) for v in out.acceptance_rate.tolist()]}")

# alpha = mean min(1, p(x)/q(x)) over drafted tokens of a reference continuation. On the model's own greedy output
# p(x) is the largest probability, so alpha reads ~1 there: measure it on sampled text.
sampled = out.sequences[1:2]
alpha = introspective_acceptance_rate(model, sampled, 3, prompt_length=ids.shape[1], mask_token_id=MASK,
                                      attention_mask=(sampled != 0).long())
print(f"introspective acceptance rate (alpha) of the random model on a sampled continuation: {alpha:.3f}")

try:
    from peft import LoraConfig, get_peft_model
except ImportError:
    print("peft not installed: skipping R-ISD")
else:
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[MASK], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random adapter weights: it really changes the mask slots
    risd = get_peft_model(model, lora).double().eval()
    out = risd.generate(input_ids=ids, attention_mask=mask, custom_generate=isd_generate, gen_block_size=3,
                        mask_token_id=MASK, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    print(f"R-ISD greedy N=3 (adapter on the mask slots only): same tokens as the base model's generate: "
          f"{torch.equal(out.sequences, plain)}")
