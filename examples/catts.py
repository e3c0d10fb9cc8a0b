"""CATTS: sample N actions per agent step, vote, and ask an arbiter only when the vote is contentious.

    python examples/catts.py

On the default model (SmolLM2-135M-Instruct, offline) in the running-total environment: each step the agent adds the
next number to its running total; an episode succeeds only if every step is right. CATTS (margin signal, tau=0.4,
N=6, the scoring arbiter: label log-probs from the same model) runs two episodes, printing each step's vote; then
majority vote (same samples: the per-step seeds are the same) runs the same episodes for comparison.
The same policy runs over a server: pass an `EndpointBackend(base_url, model)` as sampler and arbiter, with
`arbiter="generate"` when the server returns no log-probs (`transformers serve`).
"""

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.catts import CATTSConfig, CATTSPolicy, MajorityVotePolicy
from hf_fastslow.generation.catts_env import RunningTotalEnv, episode_seed

torch.set_num_threads(1)
model, tok = load_default_model()
backend = HFLocalBackend(model, tok)
env = RunningTotalEnv(n_steps=3)
config = CATTSConfig(n_samples=6, signal="margin", tau=0.4, arbiter="score", temperature=0.7, max_new_tokens=16)
catts = CATTSPolicy(sampler=backend, arbiter=backend, parse_action=env.parse_action, config=config)

for episode in range(2):
    observation = env.reset(episode)
    print(f"episode {episode}: numbers {env.numbers}")
    for t in range(env.max_steps):
        d = catts.step(observation, seed=episode_seed(0, episode, t))
        votes = ", ".join(f"{a['value']}x{c}" for a, c in zip(d.stats.representatives, d.stats.counts))
        probs = f", arbiter p = {[round(p, 2) for p in d.arbiter_probs]}" if d.arbiter_probs else ""
        tr = env.step(d.action)
        print(f"  step {t + 1}: votes {votes} ({d.invalid_samples} unparsable); U = {d.uncertainty:.2f} -> "
              f"{'arbiter' if d.arbitrated else 'majority'}{probs}; takes {d.action['value']} "
              f"({'right' if tr.correct else 'wrong'}, expected {tr.info['expected']}); {d.tokens} tokens")
        if tr.done:
            print(f"  success: {tr.success}")
            break
        observation = tr.observation

majority = MajorityVotePolicy(backend, env.parse_action, config=config)
for name, policy in (("CATTS", catts), ("majority vote", majority)):
    results = [policy.run_episode(env, episode=e, seed=0) for e in range(2)]
    print(f"{name}: {sum(r.success for r in results)}/2 episodes solved, {sum(r.arbiter_calls for r in results)} "
          f"arbiter calls, {sum(r.tokens for r in results):,} tokens "
          f"(of which arbiter {sum(r.arbiter_usage.total_tokens for r in results):,})")
