"""Staircase streaming vs Mixture-of-Agents on the default model (SmolLM2-135M-Instruct), in-process.

Three proposers (the same model with three system personas, sampled at temperature 0.7 in ONE batched `generate`)
and a greedy aggregator. Mixture-of-Agents waits for the three full proposals before its first answer token; the
staircase starts answering once every proposal has 8 tokens and continues its answer as the proposals grow.
Both runs use the same seed, so they aggregate the same proposals.

    python examples/staircase.py
"""

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.staircase import MixtureOfAgents, StaircaseMoA

torch.set_num_threads(1)
PERSONAS = ["You are a careful assistant.", "You are a concise assistant.", "You are a friendly teacher."]
QUESTION = [{"role": "user", "content": "Explain KV caching in two sentences."}]

model, tok = load_default_model()
proposers = [HFLocalBackend(model, tok, system=p, temperature=0.7) for p in PERSONAS]
settings = dict(proposal_max_new_tokens=32, max_new_tokens=32, seed=0)
moa = MixtureOfAgents(proposers, HFLocalBackend(model, tok, temperature=0.0), **settings)
staircase = StaircaseMoA(proposers, HFLocalBackend(model, tok, temperature=0.0), chunk_tokens=8,
                         agg_chunk_tokens=8, **settings)

for name, pipeline in (("MoA", moa), ("staircase", staircase)):
    print(f"--- {name}: ", end="", flush=True)
    for piece in pipeline.stream(QUESTION):
        print(piece, end="", flush=True)
    m = pipeline.last_metrics
    print(f"\n{name} TTFT {m.ttft_s:.2f} s, total {m.total_s:.2f} s, {len(m.stairs)} aggregator call(s), "
          f"{m.tokens.prompt_tokens + m.tokens.completion_tokens} tokens "
          f"({m.aggregator_tokens.completion_tokens} answer tokens), CPU {m.cpu_s:.1f} s")

same = moa.last_metrics.proposals == staircase.last_metrics.proposals
print(f"both aggregated the same proposals: {same}")
print(f"staircase TTFT / MoA TTFT = {staircase.last_metrics.ttft_s / moa.last_metrics.ttft_s:.2f} "
      "(on 2 shared cores the aggregator competes with the proposers; see benchmarks/staircase.py)")
