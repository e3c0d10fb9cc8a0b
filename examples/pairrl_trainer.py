"""PairRLTrainer (V1-PairRL) for a few steps on the default model, on the CPU.

    python examples/pairrl_trainer.py

One policy is trained as a solver and, on pairs of its own current solutions, as a pairwise judge (rating each
solution 1-10), so the judge keeps up with the solver. Two steps of a 135M model show the two phases and the
metrics the trainer logs, not a learning curve.
"""

import tempfile

import torch
from datasets import Dataset

from hf_fastslow import load_default_model
from hf_fastslow.trainers import PairRLConfig, PairRLTrainer, VerifiableTask

torch.set_num_threads(1)


class CapitalCity(VerifiableTask):
    """Correct when the reply names the capital; the 135M model gets these right often but not always."""

    def score(self, prompt, completion, answer=None, **columns):
        correct = answer.lower() in completion.lower()
        return float(correct), "correct" if correct else f"the capital is {answer}"


capitals = {"Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Italy": "Rome",
            "Spain": "Madrid", "Japan": "Tokyo", "Turkey": "Ankara"}
dataset = Dataset.from_dict({
    "prompt": [[{"role": "user", "content": f"What is the capital of {country}? Reply with just the city."}]
               for country in capitals],
    "answer": list(capitals.values()),
})

model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
with tempfile.TemporaryDirectory() as out_dir:
    args = PairRLConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0, max_steps=2,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=24, temperature=1.0,
        learning_rate=1e-5,
        loss_type="dapo", epsilon_high=0.28, scale_rewards="none", beta=0.0,  # the paper's recipe
        verifier_weight=1.0, max_solution_tokens=24, logging_steps=1, gradient_checkpointing=False,
    )
    trainer = PairRLTrainer(model=model, reward_funcs=CapitalCity(), args=args, train_dataset=dataset,
                            processing_class=tok)
    trainer.train()

for log in trainer.state.log_history:
    if "loss" in log:
        print(f"step {log['step']}: solver reward {log.get('rewards/CapitalCity/mean', float('nan')):.2f}, "
              f"judge rows {log.get('verifier/judge_rows', 0):.0f}, "
              f"judge reward {log.get('verifier/reward', float('nan')):.2f}, "
              f"judge picked the correct one of a mixed pair {log.get('verifier/pair_accuracy', float('nan')):.2f}, "
              f"unparsable verdicts {log.get('verifier/parse_failure_rate', float('nan')):.2f}")
