"""Early-readout distillation: plain-KD reduction (loss and gradients), weights, stop-grad, margin, errors, training,
the causal-LM (GKD) form."""

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from hf_fastslow.modeling.readout import (  # noqa: E402
    EarlyReadoutHead,
    TokenReadoutHead,
    check_readout_layer,
    confidence_margin,
    pool_last_token,
)
from hf_fastslow.trainers.early_readout_config import EarlyReadoutDistillationConfig  # noqa: E402
from hf_fastslow.trainers.early_readout_trainer import (  # noqa: E402
    EarlyReadoutDistillationTrainer,
    hinton_kd_terms,
    readout_weights,
)
from tests.conftest import tiny_llama  # noqa: E402


def classifier(num_labels=2, layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def dataset(n=16, num_labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 6] * n,
                              "labels": torch.randint(0, num_labels, (n,), generator=g).tolist(),
                              "teacher_logits": torch.randn(n, num_labels, generator=g).tolist()})


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, report_to=[], seed=0,
                readout_warmup_epochs=0.0, logging_steps=100, save_strategy="no", dataloader_num_workers=0)
    base.update(kw)
    return EarlyReadoutDistillationConfig(**base)


def batch(ds):
    return {k: torch.tensor(ds[k]) for k in ds.column_names}


def plain_kd(model, b, alpha, tau):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ce = torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="none")
    p_t = torch.softmax(b["teacher_logits"] / tau, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(out.logits / tau, -1))).sum(-1)
    return (alpha * ce + (1 - alpha) * tau**2 * kl).mean()


@pytest.mark.parametrize("off", [dict(weight_fn="none"), dict(readout_beta=0.0)])
def test_reweighting_off_is_plain_kd_in_loss_and_gradients(tmp_path, off):
    ds = dataset()
    model = classifier()
    trainer = EarlyReadoutDistillationTrainer(model, args=config(tmp_path, alpha=0.3, kd_temperature=2.0, **off),
                                              train_dataset=ds)
    b = batch(ds)
    model.train()
    loss = trainer.compute_loss(model, b)
    readout_ce = torch.nn.functional.cross_entropy(
        trainer.readout_forward(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      output_hidden_states=True).hidden_states, b["attention_mask"]), b["labels"])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = plain_kd(model, b, 0.3, 2.0)
    ref.backward()
    torch.testing.assert_close(loss, ref + readout_ce, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():  # the detached readout adds nothing to the student's gradients
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_reweighting_on_changes_the_loss_after_warmup(tmp_path):
    ds = dataset()
    model = classifier()
    trainer = EarlyReadoutDistillationTrainer(model, args=config(tmp_path, readout_beta=3.0, normalize_weights=False,
                                                                 readout_warmup_epochs=1.0), train_dataset=ds)
    b = batch(ds)
    during_warmup = trainer.compute_loss(model, b)
    trainer.state.epoch = 1.0
    after = trainer.compute_loss(model, b)
    assert after > during_warmup  # some readouts are wrong: their KD terms weigh more than 1


def test_readout_weights_rules():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.2, 0.0], [5.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 1, 1])
    w = readout_weights(logits, targets, "exp", beta=2.0, normalize=False)
    assert not w.requires_grad
    assert w[0] == 1 and w[1] > 1 and w[2] > 1 and w[3] > w[2]  # right -> 1; wrong: monotone in the margin
    torch.testing.assert_close(w[1], torch.exp(2.0 * confidence_margin(logits[1].detach())))
    lin = readout_weights(logits, targets, "linear", beta=2.0, normalize=False)
    torch.testing.assert_close(lin[3], 1 + 2.0 * confidence_margin(logits[3].detach()))
    norm = readout_weights(logits, targets, "exp", beta=2.0, normalize=True)
    torch.testing.assert_close(norm.mean(), torch.tensor(1.0))
    valid = torch.tensor([True, True, False, True])
    masked = readout_weights(logits, targets, "exp", beta=2.0, normalize=True, valid=valid)
    assert masked[2] == 0 and torch.isclose(masked[valid].mean(), torch.tensor(1.0))
    assert torch.equal(readout_weights(logits, targets, "none", 2.0, normalize=True), torch.ones(4))


def test_confidence_margin():
    two = torch.randn(50, 2)
    p = torch.softmax(two, -1)[:, 0]
    torch.testing.assert_close(confidence_margin(two), (2 * p - 1).abs())
    assert confidence_margin(torch.zeros(3, 5)).abs().max() < 1e-7
    m = confidence_margin(torch.randn(100, 7) * 5)
    assert (m >= 0).all() and (m <= 1).all()


def test_hinton_terms_match_a_hand_computation():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    ce, kd = hinton_kd_terms(s, t, y, 3.0)
    p_t, p_s = torch.softmax(t / 3, -1), torch.softmax(s / 3, -1)
    torch.testing.assert_close(kd, 9 * (p_t * (p_t / p_s).log()).sum(-1))
    torch.testing.assert_close(ce, -torch.log_softmax(s, -1)[torch.arange(4), y])


def test_pooling_takes_the_last_real_token_for_either_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert pool_last_token(hidden, mask).flatten().tolist() == [1.0, 7.0]


def test_errors(tmp_path):
    model = classifier()
    with pytest.raises(ValueError, match="readout_layer"):
        EarlyReadoutDistillationTrainer(model, args=config(tmp_path, readout_layer=3), train_dataset=dataset())
    with pytest.raises(ValueError, match="readout_layer"):
        check_readout_layer(model, 0)
    with pytest.raises(ValueError, match="labels"):
        EarlyReadoutDistillationTrainer(model, teacher_model=classifier(num_labels=3), args=config(tmp_path))
    with pytest.raises(ValueError, match="no teacher"):
        EarlyReadoutDistillationTrainer(model, args=config(tmp_path), train_dataset=dataset().remove_columns(
            "teacher_logits"))
    with pytest.raises(ValueError, match="3 classes"):
        EarlyReadoutDistillationTrainer(model, args=config(tmp_path), train_dataset=dataset(num_labels=3))
    for bad in [dict(weight_fn="sigmoid"), dict(weight_target="mix"), dict(alpha=1.5), dict(readout_beta=-1.0)]:
        with pytest.raises(ValueError):
            config(tmp_path, **bad)
    with pytest.raises(ValueError):
        EarlyReadoutHead(32, 1)


def test_training_runs_trains_the_readout_and_saves_it(tmp_path):
    ds = dataset(n=32)
    model = classifier()
    head_before = [p.detach().clone() for p in EarlyReadoutHead(32, 2).parameters()]
    trainer = EarlyReadoutDistillationTrainer(model, args=config(tmp_path, num_train_epochs=2, learning_rate=1e-2,
                                                                 readout_warmup_epochs=1.0), train_dataset=ds)
    start = [p.detach().clone() for p in trainer.readout.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.readout.parameters()))
    stats = trainer.flag_stats()
    assert stats["seen"] == 64 and 0 <= stats["flagged_fraction"] <= 1 and stats["weighted_steps"] == 4
    flags = trainer.readout_flags(ds)
    assert flags["wrong"].shape == (32,) and (flags["weight"][~flags["wrong"]] == 1).all()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "early_readout_head.pt").exists()
    assert len(head_before) == len(start)


def test_token_readout_head_starts_as_the_logit_lens_and_never_trains_the_lm_head():
    model = tiny_llama()
    head = TokenReadoutHead(model)
    hidden = torch.randn(2, 5, 64)
    lens = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(head(hidden), lens)
    assert [n for n, _ in head.named_parameters()] == ["adapter.weight"]
    head(hidden).sum().backward()
    assert model.lm_head.weight.grad is None and model.model.norm.weight.grad is None


def _gkd_trainer(tmp_path, **kw):
    from hf_fastslow.trainers.early_readout_gkd_config import EarlyReadoutGKDConfig
    from hf_fastslow.trainers.early_readout_gkd_trainer import EarlyReadoutGKDTrainer
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer()
    student, teacher = tiny_llama(vocab=259, seed=0), tiny_llama(vocab=259, seed=1)
    args = EarlyReadoutGKDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], lmbda=0.0,
                                 per_device_train_batch_size=2, max_length=64, readout_warmup_epochs=0.0,
                                 save_strategy="no", **kw)
    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": f"add {i} and {i}"},
                                          {"role": "assistant", "content": f"{2 * i}"}] for i in range(4)]})
    return EarlyReadoutGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  processing_class=tok)


def test_gkd_form_reduces_to_gkd_and_ignores_prompt_tokens(tmp_path):
    from trl.experimental.gkd import GKDTrainer

    trainer = _gkd_trainer(tmp_path, weight_fn="none")
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    ours = trainer.compute_loss(model, inputs)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    labels = inputs["labels"][:, 1:]
    valid = labels != -100
    assert bool(valid.any()) and not bool(valid.all())  # prompt tokens are masked in this batch
    readout = trainer.readout(out.hidden_states[1][:, :-1].detach())
    readout_ce = torch.nn.functional.cross_entropy(readout[valid], labels[valid])
    gkd = GKDTrainer.compute_loss(trainer, model, inputs)
    torch.testing.assert_close(ours, gkd + readout_ce, rtol=1e-5, atol=1e-6)
    model.train()
    trainer.compute_loss(model, inputs)
    assert trainer.flag_stats()["tokens"] == int(valid.sum())  # flags are counted on completion tokens only


def test_gkd_form_trains(tmp_path):
    trainer = _gkd_trainer(tmp_path, max_steps=2, learning_rate=1e-3)
    trainer.train()
    stats = trainer.flag_stats()
    assert stats["tokens"] > 0 and 0 <= stats["readout_accuracy"] <= 1
