"""Structured pruning (ViT-Slim) of a small ViT classifier on scikit-learn's digits: search, cut, slice, reload.

    python examples/slimming.py

1. train a ViT (from a config) on 16x16 digits for a few hundred steps;
2. attach masks (per-head attention, per-channel MLP), search with SlimSearchTrainer (task loss + L1 on the masks);
3. keep 50 % of heads and 25 % of MLP channels, physically slice, fine-tune the child briefly;
4. save it and reload it with AutoModelForImageClassification (a registered Slim class, no trust_remote_code).
"""

import tempfile

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, count_params_flops, slice_model
from hf_fastslow.trainers.slim_config import SlimSearchConfig
from hf_fastslow.trainers.slim_trainer import SlimSearchTrainer

torch.manual_seed(0)
torch.set_num_threads(1)
digits = load_digits()
x = F.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16, size=16, mode="bilinear")
x = x.expand(-1, 3, -1, -1).contiguous()
y = torch.tensor(digits.target)
perm = torch.randperm(len(y))
train_idx, test_idx = perm[:1400], perm[1400:]


class Digits(torch.utils.data.Dataset):
    def __init__(self, idx):
        self.idx = idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return {"pixel_values": x[self.idx[i]], "labels": y[self.idx[i]]}


def accuracy(model):
    with torch.no_grad():
        return float((model(x[test_idx]).logits.argmax(-1) == y[test_idx]).float().mean())


model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=128, num_labels=10))
with tempfile.TemporaryDirectory() as out:
    common = dict(use_cpu=True, report_to=[], save_strategy="no", per_device_train_batch_size=32, disable_tqdm=True)
    Trainer(model=model, args=TrainingArguments(f"{out}/dense", max_steps=300, learning_rate=2e-3, **common),
            train_dataset=Digits(train_idx)).train()
    dense = count_params_flops(model.eval(), x[:1])
    print(f"dense: accuracy {accuracy(model):.3f}, params {dense['params']:,}, MFLOPs {dense['flops'] / 1e6:.2f}")

    masks = attach_slim_masks(model, SlimConfig(attn_granularity="head", w_attn=2e-3, w_mlp=5e-4))
    SlimSearchTrainer(model=model, masks=masks, train_dataset=Digits(train_idx),
                      args=SlimSearchConfig(f"{out}/search", max_steps=100, learning_rate=1e-3, mask_lr=1e-2,
                                            **common)).train()
    kept = masks.binarize(attn_budget=0.5, mlp_budget=0.25)
    model.eval()
    print(f"kept fractions {kept}; masked (before slicing) accuracy {accuracy(model):.3f}")
    with torch.no_grad():
        masked_logits = model(x[test_idx]).logits
    child = slice_model(model, masks).eval()
    with torch.no_grad():
        same = torch.allclose(child(x[test_idx]).logits, masked_logits, atol=1e-5)
    print(f"sliced child equals the masked model: {same}")
    Trainer(model=child, args=TrainingArguments(f"{out}/child", max_steps=100, learning_rate=1e-3, **common),
            train_dataset=Digits(train_idx)).train()
    small = count_params_flops(child.eval(), x[:1])
    share = small["params"] / dense["params"]
    print(f"child: accuracy {accuracy(child):.3f}, params {small['params']:,} ({share:.0%}), "
          f"MFLOPs {small['flops'] / 1e6:.2f}; heads per layer "
          f"{[layer.attention.num_attention_heads for layer in child.vit.layers]}, MLP widths "
          f"{[layer.mlp.fc1.out_features for layer in child.vit.layers]}")
    child.save_pretrained(f"{out}/child-model")
    reloaded = AutoModelForImageClassification.from_pretrained(f"{out}/child-model").eval()
    with torch.no_grad():
        identical = torch.equal(reloaded(x[test_idx]).logits, child(x[test_idx]).logits)
    print(f"reloaded as {type(reloaded).__name__}: logits identical: {identical}")
