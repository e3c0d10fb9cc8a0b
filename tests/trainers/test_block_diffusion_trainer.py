import pytest
import torch
from datasets import Dataset
from torch.nn import functional as F

from hf_fastslow.modeling.block_diffusion import block_diffusion_config
from hf_fastslow.modeling.block_diffusion_training import block_ids, training_mask_2l, two_half_position_ids
from hf_fastslow.trainers.block_diffusion_config import BlockDiffusionTrainingConfig
from hf_fastslow.trainers.block_diffusion_trainer import BlockDiffusionTrainer
from tests.conftest import byte_tokenizer, tiny_llama

MASK = 259  # one past the byte tokenizer's 259 ids: an embedding row no text ever produces


def addition_dataset(n=16):
    return Dataset.from_dict({"prompt": [f"{i}+{i + 3}=" for i in range(n)],
                              "completion": [f"{2 * i + 3};" for i in range(n)]})


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, seed=0,
                max_length=32, mask_token_id=MASK, block_size=2)
    base.update(kw)
    return BlockDiffusionTrainingConfig(**base)


def make_trainer(tmp_path, dataset=None, model=None, **kw):
    tok = byte_tokenizer()
    model = model if model is not None else tiny_llama(vocab=len(tok) + 1, num_layers=2)
    return BlockDiffusionTrainer(model, args=make_args(tmp_path, **kw), train_dataset=dataset or addition_dataset(),
                                 processing_class=tok)


def first_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_construction_attaches_the_decoding_layout(tmp_path):
    for objective, attention in (("bd3", "block"), ("mdlm", "bidirectional"), ("idlm", "causal")):
        trainer = make_trainer(tmp_path / objective, objective=objective)
        cfg = block_diffusion_config(trainer.model)
        assert (cfg.mask_token_id, cfg.block_size, cfg.logit_shift, cfg.attention) == (MASK, 2, True, attention)


def test_bad_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        make_args(tmp_path, objective="ar")
    with pytest.raises(ValueError, match="packing"):
        make_args(tmp_path, packing=True)
    with pytest.raises(ValueError, match="logit_shift"):
        make_args(tmp_path, objective="bd3", logit_shift=False, clean_loss_weight=0.5)
    with pytest.raises(ValueError, match="no mask token"):
        make_trainer(tmp_path, mask_token_id=None)
    with pytest.raises(ValueError, match="outside the embedding"):
        make_trainer(tmp_path, mask_token_id=400)
    with pytest.raises(ValueError, match="pad token"):
        make_trainer(tmp_path, mask_token_id=0)


def test_prompt_tokens_are_never_masked_and_completion_only_labels_are_honored(tmp_path):
    trainer = make_trainer(tmp_path, objective="bd3")
    batch = first_batch(trainer)
    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert prompt.any()
    for _ in range(20):
        noisy = trainer.build_noisy_batch(batch)
        assert not (noisy["masked"] & prompt).any()
        length = batch["input_ids"].shape[1]
        x_t = noisy["input_ids"][:, :length]
        assert torch.equal(x_t[prompt], batch["input_ids"][prompt])
        assert not (noisy["targets"][:, : length - 1][prompt[:, 1:]] != -100).any()  # prompt tokens are never targets
    # control: without completion-only loss every token carries a label, and prompt tokens do get masked
    full = make_trainer(tmp_path / "full", objective="bd3", completion_only_loss=False)
    fb = first_batch(full)
    assert (fb["labels"] != -100).sum() == fb["attention_mask"].sum()
    assert any((full.build_noisy_batch(fb)["masked"] & prompt).any() for _ in range(5))


def test_assistant_only_labels_are_honored(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}"
                         "{% endgeneration %}\n{% else %}<u>{{ m['content'] }}\n{% endif %}{% endfor %}")
    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": f"{i}+1"},
                                          {"role": "assistant", "content": f"{i + 1}"}] for i in range(8)]})
    model = tiny_llama(vocab=len(tok) + 1, num_layers=2)
    trainer = BlockDiffusionTrainer(model, args=make_args(tmp_path, assistant_only_loss=True), train_dataset=ds,
                                    processing_class=tok)
    batch = first_batch(trainer)
    for row in range(batch["input_ids"].shape[0]):
        labelled = tok.decode(batch["input_ids"][row][batch["labels"][row] != -100])
        assert labelled.isdigit()
        noisy = trainer.build_noisy_batch(batch)
        assert not (noisy["masked"][row] & (batch["labels"][row] == -100)).any()


def hand_loss(model, batch, noisy, objective, clean_weight=0.0):
    """The objective written out: forward the laid-out input, CE of masked tokens / p_mask (+ clean AR CE) / N."""
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    length = ids.shape[1]
    x_t = ids.masked_fill(noisy["masked"], MASK)
    if objective == "mdlm":
        mask = (attn[:, None, :].bool() & attn[:, :, None].bool()) | torch.eye(length, dtype=torch.bool)
        pos = (attn.cumsum(-1) - 1).clamp(min=0) * attn
        logits = model(input_ids=x_t, attention_mask=mask[:, None], position_ids=pos).logits
        noisy_logits, clean_logits = logits, None
    else:
        mask = training_mask_2l(length, 2, objective, attn, block_ids=block_ids(labels, 2, attn))
        logits = model(input_ids=torch.cat([x_t, ids], 1), attention_mask=mask,
                       position_ids=two_half_position_ids(length, attn)).logits
        noisy_logits, clean_logits = logits[:, :length], logits[:, length:]
    total, n = 0.0, (labels[:, 1:] != -100).sum()
    for r in range(ids.shape[0]):
        answer = int((labels[r] != -100).nonzero()[0])  # blocks of 2 start at the answer (response alignment)
        for i in range(1, length):
            if noisy["masked"][r, i]:
                # shifted bd3: a block's first slot is read from the clean hidden before it (the committed prefix)
                first = (i - answer) % 2 == 0
                source = clean_logits if objective == "bd3" and first else noisy_logits
                total = total + F.cross_entropy(source[r, i - 1], ids[r, i]) / noisy["p_mask"][r]
            if clean_logits is not None and labels[r, i] != -100:
                total = total + clean_weight * F.cross_entropy(clean_logits[r, i - 1], ids[r, i])
    return total / n


@pytest.mark.parametrize("objective,clean_weight", [("bd3", 0.0), ("bd3", 0.5), ("mdlm", 0.0)])
def test_loss_equals_the_objective_written_out(tmp_path, objective, clean_weight):
    trainer = make_trainer(tmp_path, objective=objective, clean_loss_weight=clean_weight)
    batch = first_batch(trainer)
    trainer.noise_generator = torch.Generator().manual_seed(3)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    trainer.noise_generator = torch.Generator().manual_seed(3)
    noisy = trainer.build_noisy_batch(batch)
    assert noisy["masked"].any()
    expected = hand_loss(trainer.model, batch, noisy, objective, clean_weight)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # num_items_in_batch (the accumulated batch's target count) replaces the local normalizer
    trainer.noise_generator = torch.Generator().manual_seed(3)
    n = (batch["labels"][:, 1:] != -100).sum()
    doubled = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=2 * n)
    torch.testing.assert_close(doubled, expected / 2, atol=1e-5, rtol=1e-5)


def test_metrics_are_recomputed_on_the_denoising_targets(tmp_path):
    trainer = make_trainer(tmp_path, objective="bd3")
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    metrics = trainer._metrics["train"]
    assert set(metrics) >= {"noisy_ce", "entropy", "mean_token_accuracy", "mask_ratio", "clean_ce", "num_tokens"}
    assert 0 < metrics["mask_ratio"][-1] <= 1 and 0 < metrics["entropy"][-1] <= torch.log(torch.tensor(260.0))
    assert metrics["num_tokens"] == [int(batch["attention_mask"].sum())]
    # prediction_step's path (compute_metrics): the loss and the logits of the laid-out [x_t | x_0] forward
    loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    rows, length = batch["input_ids"].shape
    assert outputs.logits.shape == (rows, 2 * length, 260) and loss.ndim == 0


def fixed_noise_loss(trainer, batch):
    trainer.noise_generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(batch)))


@pytest.mark.parametrize("objective", ["bd3", "mdlm"])
def test_training_lowers_the_loss_and_the_checkpoint_reloads_with_its_config(tmp_path, objective):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, objective=objective, max_steps=25, learning_rate=5e-3, logging_steps=5)
    batch = first_batch(trainer)
    before = fixed_noise_loss(trainer, batch)
    trainer.noise_generator = None
    trainer.train()
    after = fixed_noise_loss(trainer, batch)
    assert after < 0.8 * before, (before, after)
    trainer.save_model(str(tmp_path / "ckpt"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert block_diffusion_config(reloaded) == block_diffusion_config(trainer.model)
    assert block_diffusion_config(reloaded).attention == {"bd3": "block", "mdlm": "bidirectional"}[objective]


def test_eager_attention_gets_the_same_loss_as_sdpa(tmp_path):
    """Eager attention adds the mask to its scores: the trainer must hand it the additive form of the bool mask."""
    tok = byte_tokenizer()
    losses = []
    for attn in ("sdpa", "eager"):
        model = tiny_llama(vocab=len(tok) + 1, num_layers=2, attn_implementation=attn)
        trainer = make_trainer(tmp_path / attn, model=model, objective="bd3")
        batch = first_batch(trainer)
        trainer.noise_generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, dict(batch)))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
