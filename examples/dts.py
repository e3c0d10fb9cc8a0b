"""DTS preference pairs on the default model, then one DPO step with an unchanged trl DPOTrainer.

    python examples/dts.py

`build_dts_pairs` asks the model for K strategies per problem, solves once per strategy, and keeps a (correct,
incorrect) pair per problem; `build_sampling_pairs` is the temperature-sampling peer with the same rule. On CPU,
DPOConfig needs `bf16=False, use_cpu=True, gradient_checkpointing=False` (trl's defaults target GPUs) and a
reference model passed in (a GGUF-loaded model has no Hub name trl could reload it from).
"""

import copy
import tempfile

import torch
from trl import DPOConfig, DPOTrainer

from hf_fastslow import load_default_model
from hf_fastslow.trainers import DTSConfig, build_dts_pairs, build_sampling_pairs

torch.set_num_threads(2)
torch.manual_seed(0)
model, tok = load_default_model()
problems = [{"question": f"Sam has {a} apples and buys {b} bags of {c} apples. How many apples does Sam have?",
             "answer": str(a + b * c)} for a, b, c in [(3, 2, 4), (10, 3, 5), (7, 4, 2), (12, 2, 6)]]
cfg = DTSConfig(num_strategies=3, max_think_tokens=48, max_solve_tokens=64, seed=0)
pairs, report = build_dts_pairs(model, tok, problems, cfg)
_, peer = build_sampling_pairs(model, tok, problems, cfg)
print(f"DTS: {report['pairs']} pairs from {report['problems']} problems, {report['generated_tokens']} generated "
      f"tokens ({report['think_tokens']} thinking), {report['correct_solutions']}/{report['solutions']} correct")
print(f"sampling peer: {peer['pairs']} pairs, {peer['generated_tokens']} generated tokens")
if len(pairs):
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=1,
                         per_device_train_batch_size=1, report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = DPOTrainer(model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=pairs.remove_columns(["answer"]), processing_class=tok)
        result = trainer.train()
    print(f"DPO step done: loss {result.training_loss:.4f}")
else:
    print("no mixed-correctness pair this time: DPO has nothing to train on (the yield is part of the result)")
