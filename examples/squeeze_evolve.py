"""Squeeze Evolve: evolve a population of answers, routing each recombination group to a cheap or an expensive tier
by the group's own token confidence, on the default model.

    python examples/squeeze_evolve.py

Both tiers are the default model here (the only model shipped offline): the "expensive" one gets a larger token
budget and a higher price, so the routing and the cost accounting are visible; with a second model, give its
`HFLocalBackend` (or an `EndpointBackend` for a server) to the expensive `Tier`. RSA (every group on the expensive
tier) and majority vote run on the same problem for comparison.
"""

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.evolution_baselines import RSA, MajorityVote
from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve
from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline


def tiers():
    cheap = Tier(HFLocalBackend(model, tok, max_new_tokens=16), "cheap", price_in=0.1, price_out=0.4)  # $ / 1M tok
    expensive = Tier(HFLocalBackend(model, tok, max_new_tokens=32), "expensive", price_in=1.0, price_out=4.0)
    return [cheap, expensive]  # cheapest first; the last tier seeds the population


config = SqueezeEvolveConfig(population=4, group_size=2, groups=4, loops=1, percentiles=(25.0,), lite_fraction=0.5,
                             fitness="confidence", top_k=20, temperature=0.8, seed=0)
problem = "What is 23 + 14? Reply with just the number."
result = SqueezeEvolve(tiers(), config).run(problem)
print(f"Squeeze Evolve answer: {result.answer} (the right answer is 37)")
print(f"fitness: {result.fitness_source}")
for rec in result.per_loop:
    routes = " ".join("vote" if r < 0 else ("cheap", "expensive")[r] for r in rec.routes) or "(seeding)"
    tokens = {name: u.total_tokens for name, u in rec.usage.items()}
    print(f"loop {rec.loop}: routes [{routes}], tokens {tokens}, answers {rec.answers}")
print(f"routed cheap: {100 * result.fraction_cheap:.0f} % of groups; cost {result.cost:.6f} "
      f"({', '.join(f'{k} {v:.6f}' for k, v in result.cost_by_tier.items())}); "
      f"CPU {result.cpu_seconds:.1f} s")

rsa = RSA(tiers()[1], config).run(problem)
vote = MajorityVote(tiers()[1], config, samples=config.population + config.groups * config.loops).run(problem)
print(f"RSA (expensive tier only) answer: {rsa.answer}, cost {rsa.cost:.6f}, CPU {rsa.cpu_seconds:.1f} s")
print(f"majority vote of {len(vote.population)} samples: {vote.answer}, cost {vote.cost:.6f}")
