"""FSTTrainer (fast-slow training) for a few steps on the default model, on the CPU.

    python examples/fst_trainer.py

Slow weights: the model, trained by GRPO-family RL. Fast weights: a system context, rewritten by a reflection model
from the task's textual feedback and kept only when it scores higher. A 135M model on a handful of addition problems
learns little in two steps; this shows the moving parts and what the trainer reports.
"""

import random
import tempfile

import torch
from datasets import Dataset

from hf_fastslow import load_default_model
from hf_fastslow.trainers import FSTConfig, FSTTrainer, VerifiableTask, load_fast_context

torch.set_num_threads(1)


class Addition(VerifiableTask):
    """Score 1 when the reply's last number is the sum; the feedback text is what the reflection model reads."""

    def score(self, prompt, completion, answer=None, **columns):
        numbers = [t for t in completion.replace(".", " ").split() if t.lstrip("-").isdigit()]
        if numbers and numbers[-1] == answer:
            return 1.0, "Correct."
        return 0.0, f"Expected {answer}; the reply ended with {numbers[-1] if numbers else 'no number'}."


rng = random.Random(0)
rows = []
for _ in range(8):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    question = f"What is {a} + {b}? Reply with just the number."
    rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})

model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
with tempfile.TemporaryDirectory() as out_dir:
    args = FSTConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=16, max_steps=2,
        learning_rate=1e-5, logging_steps=1, gradient_checkpointing=False,
        fast_every_steps=2, pareto_set_size=2, reflection_minibatch_size=2, candidates_per_round=1,
        max_proposals_per_round=1, fast_eval_batch_size=4, reflection_max_new_tokens=32,
        seed_context="You are a helpful AI assistant.",
    )
    trainer = FSTTrainer(model=model, reward_funcs=Addition(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    trainer.train()

    for log in trainer.state.log_history:
        if "reward" in log:
            fast = (f"; fast round: {log['fast/proposals']:.0f} proposal(s), {log['fast/accepted']:.0f} accepted, "
                    f"pool of {log['fast/pool_size']:.0f}") if "fast/proposals" in log else ""
            print(f"step {log['step']}: mean reward {log['reward']:.2f}{fast}")
    print(f"\nreflector: {type(trainer.reflector).__name__}")
    for event in trainer.fast_history:  # every proposal, with its minibatch score against its parent's
        print(f"  proposal at step {event['step']}: {event['outcome']}; {event.get('child', '')!r:.120}")
    print(f"best fast context (system prompt): {trainer.fast_context!r}")
    trainer.save_model(f"{out_dir}/final")  # weights + fst_state.json + a model card naming the context
    assert load_fast_context(f"{out_dir}/final") == trainer.fast_context
    print("saved and reloaded the context with the weights")
