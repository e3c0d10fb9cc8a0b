"""Feature Sieve: a tiny classifier trained with aux and forget steps on a task with an easy spurious token.

    python examples/feature_sieve.py

The label is the parity of the count of even tokens in positions 1-6 (needs the whole sequence); token 0 is a marker
that equals the label 95% of the time (easy, spurious). The sieve's aux head reads layer 1, and forget steps push
layers below it to make that head uninformative.
"""

import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

from hf_fastslow.trainers import FeatureSieveConfig, FeatureSieveTrainer

torch.manual_seed(0)
n = 512
body = torch.randint(3, 64, (n, 6))
labels = ((body % 2 == 0).sum(-1) % 2).long()
marker = torch.where(torch.rand(n) < 0.95, labels, 1 - labels) + 1  # token 1 or 2
ids = torch.cat([marker[:, None], body], dim=1)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 7] * n, "labels": labels.tolist()})
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_labels=2, pad_token_id=0)
model = LlamaForSequenceClassification(cfg)

with tempfile.TemporaryDirectory() as out:
    args = FeatureSieveConfig(output_dir=out, use_cpu=True, num_train_epochs=2, learning_rate=1e-3,
                              per_device_train_batch_size=32, aux_layer=1, forget_every=2, report_to=[],
                              save_strategy="no", disable_tqdm=True)
    trainer = FeatureSieveTrainer(model, args=args, train_dataset=ds)
    trainer.train()
stats = trainer.sieve_stats()
print(f"{stats['aux_steps']} aux steps, {stats['forget_steps']} forget steps; aux accuracy {stats['aux_accuracy']:.3f}"
      f", right after forget steps {stats['aux_accuracy_after_forget']:.3f}; last forget loss "
      f"{stats['forget_loss']:.3f} (log 2 = {torch.log(torch.tensor(2.0)):.3f} is fully forgotten)")
