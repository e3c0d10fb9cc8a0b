"""Lossless speculative decoding with the DAS suffix-tree drafter on the default model.

    python examples/das_speculative.py

DAS (arXiv 2511.13841) drafts from earlier outputs of the same prompt (as in RL, where every epoch samples the same
problems again) and from the running request itself. The target model verifies every draft, so greedy output is
token for token what plain `generate` returns; what changes is how many tokens each target forward yields.
"""

import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation import DASDrafter, speculative_generate

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
messages = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

t0 = time.perf_counter()
plain = model.generate(ids, max_new_tokens=48, do_sample=False)
print(f"plain generate: {time.perf_counter() - t0:.1f} s, 1.00 tokens per target forward")

drafter = DASDrafter()  # keeps a per-prompt history across calls
for epoch in (1, 2):  # the 2nd call drafts from the 1st call's output
    t0 = time.perf_counter()
    out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, max_new_tokens=48)
    stats = drafter.last_stats
    print(f"DAS call {epoch}: {time.perf_counter() - t0:.1f} s, {stats.tokens_per_forward:.2f} tokens per target "
          f"forward, {stats.mean_acceptance_length:.2f} tokens per verification round; "
          f"same tokens as plain generate: {torch.equal(out, plain)}")

print("\n" + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
