"""qTTT on the default model: answer a retrieval question about a context with and without query-only test-time
training on that context.

    python examples/qttt.py

`qttt_generate` prefills the context once, takes a few next-token gradient steps on random spans of it that update
only the attention query projections (the spans attend over the frozen prefill cache), answers over the same cache,
and restores the weights bit for bit before returning.
"""

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation.qttt import QTTTConfig, qttt_generate

torch.set_num_threads(2)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
context = "".join(f"Record {k}: access code {c}.\n" for k, c in [
    ("4821-KX", 73915), ("4821-XK", 10442), ("4812-KX", 58231), ("7310-PQ", 99104), ("7310-QP", 22871),
    ("5527-MN", 31006), ("5572-MN", 64413), ("9034-AB", 47720)])
question = "What is the access code of record 4821-KX? Reply with the code only."
before = {n: p.detach().clone() for n, p in model.named_parameters()}

plain = qttt_generate(model, tok, context, question, QTTTConfig(steps=0), max_new_tokens=24)
print(f"in-context answer: {plain!r}")
answer, state = qttt_generate(model, tok, context, question, QTTTConfig(steps=8, span_len=32, lr=1e-4),
                              return_state=True, max_new_tokens=24)
print(f"qTTT answer after {len(state.losses)} steps: {answer!r} (span loss {state.losses[0]:.3f} -> "
      f"{state.losses[-1]:.3f}, context {state.context_len} tokens)")
same = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
print(f"weights restored bit for bit: {same}")
