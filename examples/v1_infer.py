"""V1-Infer: pick one of several sampled answers by pairwise self-verification, on the default model.

    python examples/v1_infer.py

The model samples N candidate solutions, then judges pairs of them (two 1-10 ratings per call) in a budgeted,
uncertainty-guided tournament; the candidate with the highest weighted win rate is picked. Majority vote and one
rating per candidate (pointwise) run on the same candidates for comparison.
"""

import re

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation import HFJudge, PairwiseTournament, PointwiseSelector, majority_vote, v1_generate

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
problem = "A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar bill. How much change?"
torch.manual_seed(0)
candidates = v1_generate(model, tok, problem + " End with: The answer is <number>.", n=4, max_new_tokens=64)
for i, text in enumerate(candidates):
    numbers = re.findall(r"\d+", text)
    print(f"candidate {i} (last number {numbers[-1] if numbers else 'none'}): {' '.join(text.split())[:100]}...")

judge = HFJudge(model, tok, max_new_tokens=16)  # the same model, as a pairwise judge (greedy)
pick = PairwiseTournament(judge, budget_multiplier=2, seed=0).select(problem, candidates)
print(f"\nV1-Infer picks candidate {pick.index} after {pick.calls} judge calls "
      f"({pick.parse_failures} unparsable verdicts); weighted win rates {[round(m, 2) for m in pick.scores]}")
print(f"pointwise rating picks candidate {PointwiseSelector(judge).select(problem, candidates).index}")
print(f"majority vote picks candidate {majority_vote(candidates).index}")
print("(the right answer is 8)")
