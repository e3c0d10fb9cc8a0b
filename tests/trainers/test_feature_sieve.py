"""Feature Sieve: parameter scoping of each step (bitwise), the forget loss, plain-Trainer reduction, no gradient
leak into the main step, errors, checkpoint round trip of the three optimizer states."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer, TrainingArguments

from hf_fastslow.trainers.feature_sieve_config import FeatureSieveConfig
from hf_fastslow.trainers.feature_sieve_trainer import FeatureSieveTrainer, forget_loss


def classifier(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 6] * n,
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def args(tmp_path, cls=FeatureSieveConfig, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, report_to=[], seed=0,
                logging_steps=100, save_strategy="no", dataloader_num_workers=0, learning_rate=1e-2)
    base.update(kw)
    return cls(**base)


def batch(ds):
    return {k: torch.tensor(ds[k]) for k in ds.column_names}


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_each_step_moves_only_its_parameters(tmp_path):
    model = classifier()
    trainer = FeatureSieveTrainer(model, args=args(tmp_path, aux_layer=2, forget_lr=0.5), train_dataset=dataset())
    trainer.create_optimizer()
    b = batch(dataset())
    m0, a0 = snapshot(model), snapshot(trainer.aux_head)
    trainer.aux_step(model, b)
    assert not changed(model, m0) and changed(trainer.aux_head, a0)
    m1, a1 = snapshot(model), snapshot(trainer.aux_head)
    trainer.forget_step(model, b)
    moved = changed(model, m1)
    assert moved and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in moved)
    assert any(n.startswith("model.layers.1.") for n in moved)
    assert not changed(trainer.aux_head, a1)
    a2 = snapshot(trainer.aux_head)
    trainer.optimizer.zero_grad()
    loss = trainer.compute_loss(model, b)
    loss.backward()
    trainer.optimizer.step()
    assert not changed(trainer.aux_head, a2) and changed(model, m1)


def test_embeddings_move_only_when_asked(tmp_path):
    for include in (False, True):
        model = classifier()
        trainer = FeatureSieveTrainer(model, args=args(tmp_path, forget_lr=0.5, include_embeddings_in_forget=include),
                                      train_dataset=dataset())
        trainer.create_optimizer()
        before = snapshot(model)
        trainer.forget_step(model, batch(dataset()))
        assert ("model.embed_tokens.weight" in changed(model, before)) == include


def test_forget_loss():
    assert math.isclose(float(forget_loss(torch.zeros(4, 5))), math.log(5), rel_tol=1e-6)
    z = torch.zeros(2, 5, requires_grad=True)
    forget_loss(z).backward()
    assert z.grad.abs().max() < 1e-7
    logits = torch.randn(6, 5)
    p = torch.softmax(logits, -1)
    kl_u_p = (0.2 * (torch.log(torch.tensor(0.2)) - p.log())).sum(-1).mean()
    torch.testing.assert_close(forget_loss(logits), kl_u_p + math.log(5))


def test_disabled_sieve_trains_exactly_like_plain_trainer(tmp_path):
    ds = dataset()
    plain_model = classifier()
    Trainer(plain_model, args=args(tmp_path / "a", cls=TrainingArguments, max_steps=4), train_dataset=ds).train()
    model = classifier()
    trainer = FeatureSieveTrainer(model, args=args(tmp_path / "b", max_steps=4, forget_every=0), train_dataset=ds)
    trainer.train()
    for (n, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), n
    assert trainer.sieve_stats()["aux_steps"] == 4 and trainer.sieve_stats()["forget_steps"] == 0


def test_main_step_gradients_hold_nothing_from_the_sieve(tmp_path):
    model = classifier()
    trainer = FeatureSieveTrainer(model, args=args(tmp_path, forget_every=1, forget_lr=0.5), train_dataset=dataset())
    trainer.create_optimizer()
    b = batch(dataset())
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first training_step
    trainer.training_step(model, dict(b))
    assert trainer.sieve_stats()["forget_steps"] == 1
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.grad is None for p in trainer.aux_head.parameters())


def test_training_with_forgetting_runs_and_checkpoints_round_trip(tmp_path):
    ds = dataset(n=32)
    trainer = FeatureSieveTrainer(classifier(), args=args(tmp_path, max_steps=4, forget_every=2, save_steps=4,
                                                          save_strategy="steps"), train_dataset=ds)
    trainer.train()
    stats = trainer.sieve_stats()
    assert stats["aux_steps"] == 4 and stats["forget_steps"] == 2 and stats["forget_loss"] >= math.log(3) - 1e-5
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / "feature_sieve.pt").exists()
    resumed = FeatureSieveTrainer(classifier(seed=5), args=args(tmp_path, max_steps=4, forget_every=2),
                                  train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for mine, theirs in [(resumed.aux_optimizer, trainer.aux_optimizer),
                         (resumed.forget_optimizer, trainer.forget_optimizer)]:
        a, b = mine.state_dict(), theirs.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            for name, value in a["state"][k].items():
                assert torch.equal(value, b["state"][k][name])
    for p, q in zip(resumed.aux_head.parameters(), trainer.aux_head.parameters()):
        assert torch.equal(p, q)


def test_errors(tmp_path):
    for bad in (0, 3):
        with pytest.raises(ValueError, match="aux_layer"):
            FeatureSieveTrainer(classifier(), args=args(tmp_path, aux_layer=bad))
    with pytest.raises(ValueError, match="forget_every"):
        args(tmp_path, forget_every=-1)

    class NoLayers(torch.nn.Module):
        config = classifier().config

    with pytest.raises(TypeError, match="decoder-layer list"):
        FeatureSieveTrainer(NoLayers(), args=args(tmp_path))
    with pytest.raises(TypeError, match="FeatureSieveConfig"):
        FeatureSieveTrainer(classifier(), args=args(tmp_path, cls=TrainingArguments))
