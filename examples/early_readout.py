"""Early-readout distillation: a tiny student distilled from cached teacher logits, with an early readout that
up-weights the examples it gets confidently wrong.

    python examples/early_readout.py

The teacher here is a tiny random classifier whose logits are cached as the `teacher_logits` column (the way a
large teacher is used on a small machine); see benchmarks/spurious_features.py for the real teacher and task.
"""

import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

from hf_fastslow.trainers import EarlyReadoutDistillationConfig, EarlyReadoutDistillationTrainer

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_labels=2, pad_token_id=0)
teacher, student = LlamaForSequenceClassification(cfg).eval(), LlamaForSequenceClassification(cfg)
ids = torch.randint(1, 64, (256, 8))
labels = (ids[:, 0] > 32).long()  # the label is a property of the first token
with torch.no_grad():
    cached = teacher(input_ids=ids).logits
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 256, "labels": labels.tolist(),
                        "teacher_logits": cached.tolist()})

with tempfile.TemporaryDirectory() as out:
    args = EarlyReadoutDistillationConfig(output_dir=out, use_cpu=True, num_train_epochs=3, learning_rate=1e-3,
                                          per_device_train_batch_size=32, readout_layer=1, readout_beta=2.0,
                                          readout_warmup_epochs=1.0, report_to=[], save_strategy="no",
                                          disable_tqdm=True)
    trainer = EarlyReadoutDistillationTrainer(student, args=args, train_dataset=ds)
    trainer.train()
    stats = trainer.flag_stats()
    flags = trainer.readout_flags(ds)
print(f"readout accuracy {stats['readout_accuracy']:.3f}, flagged after warm-up {stats['flagged_fraction']:.3f} "
      f"of {stats['seen']} training examples seen")
print(f"mean weight of flagged examples {flags['weight'][flags['wrong']].mean():.3f} (right readouts weigh 1.0)")
