"""Aurora: a speculator that starts untrained and learns from the traffic it serves, on the default model.

    python examples/aurora_online.py

An EAGLE-style draft head reads the target's hidden states and proposes tokens; every verification outcome becomes
training data. Here the trainer runs inline (`drafter.trainer.train(n)` between requests) so the run is
deterministic; in serving, `drafter.start()` trains in a background thread and hot-swaps the new weights in.
Output is always the target's own greedy output; only the tokens per target forward change.
"""

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation import AuroraDrafter, speculative_generate

torch.set_num_threads(1)
torch.manual_seed(0)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
drafter = AuroraDrafter(model, max_draft_tokens=3, seed=0, lr=2e-3, ttt_length=3, batch_size=2, max_len=32,
                        sync_every=5)  # day-0 head: random fusion layer, output layer copied from the target
print(f"draft head: {sum(p.numel() for p in drafter.head.parameters()) / 1e6:.1f} M parameters")

question = [{"role": "user", "content": "List the first ten square numbers, separated by commas."}]
ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
plain = model.generate(ids, max_new_tokens=32, do_sample=False)

for request in (1, 2, 3):
    out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, max_new_tokens=32)
    stats = drafter.last_stats
    print(f"request {request}: head version {drafter.version}, {stats.tokens_per_forward:.2f} tokens per target "
          f"forward, acceptance {stats.acceptance_rate:.2f}, same tokens as plain generate: {torch.equal(out, plain)}")
    losses = drafter.trainer.train(15)  # 15 AdamW steps on the replay buffer of verified traces
    print(f"  trained 15 steps on the replay buffer: loss {losses[0]:.2f} -> {losses[-1]:.2f}")

print("\n" + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
