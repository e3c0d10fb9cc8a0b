import copy
import dataclasses
import math
import warnings

import pytest
import torch
from datasets import Dataset
from torch.nn import functional as F

from hf_fastslow.modeling.care import CAREConfig, collect_kv_second_moments, convert_gqa_to_mla
from hf_fastslow.trainers.kv_healing_config import KVHealingConfig
from hf_fastslow.trainers.kv_healing_trainer import KVHealingTrainer
from tests.conftest import byte_tokenizer, tiny_llama


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def text_dataset(n=8):
    return Dataset.from_dict({"text": [f"the cat number {i} sat on mat {i * 7 % 5}." for i in range(n)]})


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, seed=0,
                max_length=48)
    base.update(kw)
    return KVHealingConfig(**base)


def converted(teacher, rank):
    student = copy.deepcopy(teacher)
    moments = collect_kv_second_moments(student, [torch.randint(3, 250, (4, 32), generator=torch.Generator()
                                                                .manual_seed(1))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full-rank clamp warning
        return convert_gqa_to_mla(student, moments, CAREConfig(rank=rank, allocation="uniform"))


def make_trainer(tmp_path, rank, **kw):
    tok = byte_tokenizer()
    teacher = tiny_llama(vocab=len(tok), num_layers=2)
    student = converted(teacher, rank)
    trainer = KVHealingTrainer(student, teacher, args=make_args(tmp_path, **kw), train_dataset=text_dataset(),
                               processing_class=tok)
    return trainer, teacher


def first_batch(trainer):
    trainer.model.train()  # metrics go to the "train" bucket, as during `train()`
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_kl_is_zero_at_init_for_a_full_rank_conversion_and_not_for_a_compressed_one(tmp_path):
    full, _ = make_trainer(tmp_path / "full", rank=32)  # tiny_llama: 2 KV heads x 16 = width 32
    full.compute_loss(full.model, first_batch(full))
    assert full._metrics["train"]["kl"][-1] < 1e-6
    low, _ = make_trainer(tmp_path / "low", rank=4)
    low.compute_loss(low.model, first_batch(low))
    assert low._metrics["train"]["kl"][-1] > 1e-4


def test_loss_is_ce_plus_weighted_tempered_kl(tmp_path):
    trainer, teacher = make_trainer(tmp_path, rank=4, kl_weight=0.5, kl_temperature=2.0)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        s = trainer.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = labels[:, 1:] != -100
    ce = F.cross_entropy(s[mask], labels[:, 1:][mask])
    p_t = F.softmax(t[mask] / 2.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s[mask] / 2.0, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx((ce + 0.5 * 4.0 * kl).item(), rel=1e-5)
    assert trainer._metrics["train"]["ce"][-1] == pytest.approx(ce.item(), rel=1e-5)


def test_a_healing_run_trains_the_student_only(tmp_path):
    trainer, teacher = make_trainer(tmp_path, rank=4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.model.named_parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["kl"] > 0 for h in logs)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kl_weight"):
        make_args(tmp_path, kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_temperature"):
        make_args(tmp_path, kl_temperature=0.0)
    tok = byte_tokenizer()
    student = tiny_llama(vocab=len(tok), num_layers=2)
    from trl import SFTConfig

    with pytest.raises(TypeError, match="KVHealingConfig"):
        KVHealingTrainer(student, student, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                         train_dataset=text_dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="vocabulary"):
        KVHealingTrainer(student, tiny_llama(vocab=300, num_layers=2), args=make_args(tmp_path),
                         train_dataset=text_dataset(), processing_class=tok)


def test_callers_config_is_not_changed(tmp_path):
    args = make_args(tmp_path)
    fields = [f.name for f in dataclasses.fields(args)]
    before = {name: copy.deepcopy(getattr(args, name)) for name in fields}
    tok = byte_tokenizer()
    teacher = tiny_llama(vocab=len(tok), num_layers=2)
    KVHealingTrainer(converted(teacher, 4), teacher, args=args, train_dataset=text_dataset(), processing_class=tok)
    assert {name: getattr(args, name) for name in fields} == before
