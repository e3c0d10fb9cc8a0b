"""SlimSearchTrainer: the sparsity-regularised mask search on transformers.Trainer."""

import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, slice_model
from hf_fastslow.trainers.slim_config import SlimSearchConfig
from hf_fastslow.trainers.slim_trainer import SlimSearchTrainer


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=48, num_labels=3))


def args(tmp_path, **kw):
    return SlimSearchConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, use_cpu=True,
                            report_to=[], logging_steps=1, save_strategy="no", weight_decay=0.5, **kw)


def test_penalty_is_added_and_masks_get_their_own_group(tmp_path):
    model = tiny_vit()
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="head", w_attn=0.01, w_mlp=0.001))
    trainer = SlimSearchTrainer(model=model, masks=masks, args=args(tmp_path, mask_lr=0.05), train_dataset=Rows())
    batch = {k: v for k, v in trainer.data_collator([Rows()[i] for i in range(4)]).items()}
    plain = Trainer.compute_loss(trainer, model, batch)
    with_penalty = trainer.compute_loss(model, batch)
    torch.testing.assert_close(with_penalty - plain, torch.tensor(0.01 * 8 + 0.001 * 96))
    opt = trainer.create_optimizer()
    mask_group = [g for g in opt.param_groups if any(p is masks.mask_parameters()[0] for p in g["params"])]
    assert len(mask_group) == 1 and mask_group[0]["weight_decay"] == 0.0 and mask_group[0]["lr"] == 0.05
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(list(model.parameters())) + len(masks.mask_parameters())  # each parameter once
    before = [p.detach().clone() for p in masks.mask_parameters()]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, masks.mask_parameters()))
    logged = [h for h in trainer.state.log_history if "slim/attn_mean_abs" in h]
    assert logged and "slim/penalty" in logged[0]


def test_mask_only_search_freezes_weights_and_the_child_fine_tunes(tmp_path):
    model = tiny_vit()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="dim", mlp_backend="ia3"))
    SlimSearchTrainer(model=model, masks=masks, args=args(tmp_path, train_weights=False, mask_lr=0.1),
                      train_dataset=Rows()).train()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    masks.binarize(attn_budget=0.5, mlp_budget=0.5)
    child = slice_model(model, masks)
    for p in child.parameters():
        p.requires_grad_(True)
    Trainer(model=child, args=TrainingArguments(output_dir=str(tmp_path / "child"), max_steps=2, use_cpu=True,
                                                report_to=[], save_strategy="no"), train_dataset=Rows()).train()


def test_trainer_refuses_binarized_or_foreign_masks(tmp_path):
    model = tiny_vit()
    masks = attach_slim_masks(model, SlimConfig())
    with pytest.raises(ValueError, match="different model"):
        SlimSearchTrainer(model=tiny_vit(), masks=masks, args=args(tmp_path))
    masks.binarize(budget=0.5)
    with pytest.raises(ValueError, match="already binarized"):
        SlimSearchTrainer(model=model, masks=masks, args=args(tmp_path))
    with pytest.raises(ValueError, match="mask_lr"):
        args(tmp_path, mask_lr=0.0)
