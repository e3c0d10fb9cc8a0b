import copy
import math

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("datasets")
from datasets import Dataset  # noqa: E402

from hf_fastslow.trainers.block_diffusion_config import BlockDiffusionTrainingConfig  # noqa: E402
from hf_fastslow.trainers.block_diffusion_trainer import BlockDiffusionTrainer  # noqa: E402
from hf_fastslow.trainers.rcd_config import RCDTrainingConfig  # noqa: E402
from hf_fastslow.trainers.rcd_trainer import RCDTrainer, slot_logits  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_llama  # noqa: E402

BLOCK = 4


def text_dataset(n=8):
    # prompt-completion rows: completion-only labels, so the response-aligned blocks start after each prompt
    return Dataset.from_dict({"prompt": [f"{i} plus {i * 7 % 5}" + " ." * (i % 3) for i in range(n)],
                              "completion": [f" is {i + i * 7 % 5}, right." for i in range(n)]})


def make_args(tmp_path, cls=RCDTrainingConfig, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, seed=0,
                max_length=32, block_size=BLOCK, objective="bd3")
    base.update(kw)
    return cls(**base)


def models(seed_ref=1):
    tok = byte_tokenizer()
    mask_id = len(tok)  # one row past the tokenizer: an id no text contains
    target = tiny_llama(vocab=len(tok) + 1, num_layers=2, seed=0)
    ref = tiny_llama(vocab=len(tok) + 1, num_layers=1, seed=seed_ref)
    with torch.no_grad():  # a confident reference: peaked, slot-dependent distributions (a random head is ~uniform,
        ref.lm_head.weight.mul_(40.0)  # which would make every slot's residual the same mean embedding)
    return tok, mask_id, target, ref


def make_trainer(tmp_path, **kw):
    tok, mask_id, target, ref = models()
    trainer = RCDTrainer(target, ref, args=make_args(tmp_path, mask_token_id=mask_id, **kw),
                         train_dataset=text_dataset(), processing_class=tok)
    return trainer, ref


def first_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def seeded(trainer, seed=2):  # rows masked at rates 0.38-0.64: many masked slots open a response block
    trainer.noise_generator = torch.Generator().manual_seed(seed)


def capture_inputs_embeds(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()),
                                             with_kwargs=True)
    return seen, handle


def test_residuals_go_only_to_masked_slots_of_the_noisy_half(tmp_path):
    trainer, _ = make_trainer(tmp_path)
    inputs = first_batch(trainer)
    seeded(trainer)
    batch = trainer.build_noisy_batch(inputs)
    seen, handle = capture_inputs_embeds(trainer.model)
    try:
        seeded(trainer)
        trainer.compute_loss(trainer.model, dict(inputs))
    finally:
        handle.remove()
    embeds = seen[0]
    plain = trainer.model.get_input_embeddings()(batch["input_ids"]).detach()
    length = batch["masked"].shape[1]
    changed = (embeds != plain).any(-1)
    assert batch["masked"].any() and (~batch["masked"] & (batch["labels"] != -100)).any()
    assert torch.equal(changed[:, :length], batch["masked"])  # every masked noisy slot, nothing else of that half
    assert not changed[:, length:].any()  # the clean half is untouched, bit for bit
    assert 0.05 < trainer._metrics["train"]["residual_alpha"][-1] < 0.95


def test_loss_is_the_one_over_t_weighted_ce_on_residual_inputs(tmp_path):
    trainer, ref = make_trainer(tmp_path)
    inputs = first_batch(trainer)
    seeded(trainer)
    batch = trainer.build_noisy_batch(inputs)
    seeded(trainer)
    n_items = 37
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_items)
    # by hand: reference distribution of each slot ([x_t | x_0] layout, shifted: slot j from hidden j-1, from the
    # clean hidden j-1 at a block's first slot), alpha = H/log V, e = (1-a) E(m) + a E^T p on masked noisy slots
    model = trainer.model
    mask4d = batch["attention_mask"]
    pos = batch["position_ids"]
    with torch.no_grad():
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=pos).logits.double()
    length = batch["masked"].shape[1]
    table = model.get_input_embeddings().weight.double()
    embeds = table[batch["input_ids"]].clone()
    blocks = batch["block_ids"]  # response-aligned: blocks start at each completion's first token
    for r in range(embeds.shape[0]):
        for j in range(1, length):
            if not batch["masked"][r, j]:
                continue
            same = int(blocks[r, j]) == int(blocks[r, j - 1])
            src = ref_logits[r, j - 1] if same else ref_logits[r, length + j - 1]
            p = src.softmax(-1)
            alpha = -(p * p.log()).sum() / math.log(p.numel())
            embeds[r, j] = (1 - alpha) * table[batch["input_ids"][r, j]] + alpha * p @ table
    logits = model(inputs_embeds=embeds.float(), attention_mask=mask4d, position_ids=pos).logits.double()
    total = 0.0
    for r in range(embeds.shape[0]):
        for j in range(length - 1):
            if batch["masked"][r, j + 1]:
                # a masked block-first token is scored on the clean hidden before it (where a shifted decoder reads it)
                opens_block = int(blocks[r, j + 1]) != int(blocks[r, j])
                ce = F.cross_entropy(logits[r, length + j if opens_block else j], batch["clean_ids"][r, j + 1])
                total += ce / batch["p_mask"][r].double()
    assert loss.item() == pytest.approx(total.item() / n_items, rel=1e-4)


def test_fixed_zero_alpha_is_seqd_bit_for_bit(tmp_path):
    trainer, _ = make_trainer(tmp_path, rcd_alpha_mode="fixed", rcd_fixed_alpha=0.0)
    tok, mask_id, target, _ = models()
    target.load_state_dict(trainer.model.state_dict())
    seqd = BlockDiffusionTrainer(target, args=make_args(tmp_path, cls=BlockDiffusionTrainingConfig,
                                                        mask_token_id=mask_id),
                                 train_dataset=text_dataset(), processing_class=tok)
    inputs = first_batch(trainer)
    seqd.model.train()
    seeded(trainer)
    seeded(seqd)
    a = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=20)
    b = seqd.compute_loss(seqd.model, dict(inputs), num_items_in_batch=20)
    assert torch.equal(a, b)


def test_training_moves_the_target_only_and_the_reference_stays_frozen_in_eval(tmp_path):
    trainer, ref = make_trainer(tmp_path)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    target_before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    grads = []
    hooks = [p.register_hook(lambda g: grads.append(g)) for p in ref.parameters() if p.requires_grad]
    grad_mode = []
    hooks.append(ref.register_forward_pre_hook(lambda *_: grad_mode.append(torch.is_grad_enabled())))
    trainer.train()
    for h in hooks:
        h.remove()
    assert grad_mode and not any(grad_mode)  # the reference runs under no_grad
    assert trainer.ref_model is ref and not ref.training
    assert not any(p.requires_grad for p in ref.parameters()) and not grads
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(target_before[k], v) for k, v in trainer.model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and 0 < h["residual_alpha"] <= 1 for h in logs)


def test_slot_logits_take_a_block_first_slot_from_the_clean_half():
    length, vocab = 8, 3
    logits = torch.arange(2 * length, dtype=torch.float32)[None, :, None].expand(1, -1, vocab)
    batch = {"noisy_half": slice(0, length), "clean_half": slice(length, 2 * length),
             "position_ids": torch.arange(length).repeat(2)[None]}
    got = slot_logits(logits, batch, logit_shift=True, block_size=4)[0, :, 0].tolist()
    assert got == [0, 0, 1, 2, 8 + 3, 4, 5, 6]  # slot 4 opens block 1: from clean hidden 3
    assert slot_logits(logits, batch, logit_shift=False, block_size=4)[0, :, 0].tolist() == list(range(length))


def test_bad_reference_is_refused(tmp_path):
    tok, mask_id, target, ref = models()
    args = make_args(tmp_path, mask_token_id=mask_id)
    kw = dict(train_dataset=text_dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="required"):
        RCDTrainer(target, None, args=args, **kw)
    with pytest.raises(ValueError, match="same object"):
        RCDTrainer(target, target, args=args, **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        RCDTrainer(target, tiny_llama(vocab=len(tok) + 5, num_layers=1), args=args, **kw)
    other_tok = byte_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer"):
        RCDTrainer(copy.deepcopy(target), ref, args=args, ref_processing_class=other_tok, **kw)
    from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion

    attach_block_diffusion(ref, BlockDiffusionConfig(mask_token_id=mask_id - 1, block_size=BLOCK))
    with pytest.raises(ValueError, match="mask token"):
        RCDTrainer(copy.deepcopy(target), ref, args=args, **kw)
    with pytest.raises(ValueError, match="rcd_alpha_mode"):
        make_args(tmp_path, mask_token_id=mask_id, rcd_alpha_mode="nope")
    with pytest.raises(TypeError, match="RCDTrainingConfig"):
        RCDTrainer(target, ref, args=make_args(tmp_path, cls=BlockDiffusionTrainingConfig, mask_token_id=mask_id),
                   **kw)
