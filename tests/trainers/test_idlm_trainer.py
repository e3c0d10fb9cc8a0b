import pytest
import torch
from torch.nn import functional as F

from hf_fastslow.modeling.block_diffusion import block_diffusion_config
from hf_fastslow.trainers.idlm_config import IDLMConfig
from hf_fastslow.trainers.idlm_trainer import IDLMTrainer
from tests.conftest import byte_tokenizer, tiny_llama
from tests.trainers.test_block_diffusion_trainer import MASK, addition_dataset, first_batch


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, seed=0,
                max_length=32, mask_token_id=MASK, block_length=2)
    base.update(kw)
    return IDLMConfig(**base)


def make_trainer(tmp_path, model=None, **kw):
    tok = byte_tokenizer()
    model = model if model is not None else tiny_llama(vocab=len(tok) + 1, num_layers=2)
    peft_config = kw.pop("peft_config", None)
    return IDLMTrainer(model, args=make_args(tmp_path, **kw), train_dataset=addition_dataset(),
                       processing_class=tok, peft_config=peft_config)


def staircase_ces(model, batch, b, align="response"):
    """CE_noisy and CE_clean computed WITHOUT the 2L mask: noisy slot i of block k is the causal forward of
    [clean tokens before the block | the block's x_t up to i] (what an ISD round sees); the clean half is the plain AR
    forward on x_0. Both summed over the shifted response targets and divided by their count. Blocks start at the
    answer ("response"; prompt tokens are blocks of one) or on the grid pos // b ("absolute")."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    x_t = ids.masked_fill(labels != -100, MASK)
    noisy_sum, clean_sum = 0.0, 0.0
    for r in range(rows):
        real = int(batch["attention_mask"][r].sum())
        clean_logits = model(input_ids=ids[r:r + 1, :real]).logits[0]
        for i in range(real - 1):
            if labels[r, i + 1] == -100:
                continue
            answer = int((labels[r] != -100).nonzero()[0])
            if align == "absolute":
                start = (i // b) * b
            else:
                start = i if i < answer else answer + ((i - answer) // b) * b
            seq = torch.cat([ids[r, :start], x_t[r, start:i + 1]])[None]
            noisy_sum = noisy_sum + F.cross_entropy(model(input_ids=seq).logits[0, -1], ids[r, i + 1])
            clean_sum = clean_sum + F.cross_entropy(clean_logits[i], ids[r, i + 1])
    n = (labels[:, 1:] != -100).sum()
    return noisy_sum / n, clean_sum / n


def test_config_maps_block_length_and_alpha_and_refuses_bad_values(tmp_path):
    args = make_args(tmp_path, block_length=3, ce_alpha=0.5)
    assert (args.block_size, args.clean_loss_weight, args.mask_rate, args.objective) == (3, 0.5, 1.0, "idlm")
    with pytest.raises(ValueError, match="objective"):
        make_args(tmp_path, objective="bd3")
    with pytest.raises(ValueError, match="ce_alpha"):
        make_args(tmp_path, ce_alpha=-1.0)
    with pytest.raises(ValueError, match="logit_shift"):
        make_args(tmp_path, logit_shift=False)


@pytest.mark.parametrize("b,align", [(1, "response"), (2, "response"), (3, "response"), (3, "absolute")])
def test_loss_with_alpha_zero_is_the_noisy_ce_and_alpha_adds_the_ar_ce(tmp_path, b, align):
    trainer = make_trainer(tmp_path, block_length=b, ce_alpha=0.0, block_alignment=align)
    batch = first_batch(trainer)
    noisy_ce, clean_ce = staircase_ces(trainer.model, batch, b, align)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), noisy_ce, atol=1e-5, rtol=1e-5)
    trainer.args.ce_alpha = 0.2
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), noisy_ce + 0.2 * clean_ce,
                               atol=1e-5, rtol=1e-5)
    assert trainer.build_noisy_batch(batch)["masked"].sum() == (batch["labels"] != -100).sum()  # mask rate 1


def test_auto_balance_factor_carries_no_gradient(tmp_path):
    trainer = make_trainer(tmp_path, auto_balance=True)
    batch = first_batch(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    loss = trainer.compute_loss(trainer.model, dict(batch))
    got = grads(loss)
    noisy_ce, clean_ce = staircase_ces(trainer.model, batch, 2)
    ratio = (noisy_ce / clean_ce).item()
    torch.testing.assert_close(loss, 2 * noisy_ce, atol=1e-5, rtol=1e-5)  # alpha * CE_clean == CE_noisy in value
    assert trainer._metrics["train"]["ce_alpha"][-1] == pytest.approx(ratio, rel=1e-4)
    want = grads(noisy_ce + ratio * clean_ce)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_training_lowers_the_loss_and_keeps_the_config(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, max_steps=20, learning_rate=5e-3)
    batch = first_batch(trainer)
    with torch.no_grad():
        before = float(trainer.compute_loss(trainer.model, dict(batch)))
    trainer.train()
    with torch.no_grad():
        after = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert after < 0.8 * before, (before, after)
    trainer.save_model(str(tmp_path / "ckpt"))
    cfg = block_diffusion_config(AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt")))
    assert (cfg.mask_token_id, cfg.block_size, cfg.logit_shift, cfg.attention) == (MASK, 2, True, "causal")


def test_r_isd_trains_only_an_adapter_on_the_noisy_half(tmp_path):
    from peft import PeftModel

    tok = byte_tokenizer()
    base = tiny_llama(vocab=len(tok) + 1, num_layers=2)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = make_trainer(tmp_path, model=base, lora_gated=True, lora_r=4, max_steps=6, learning_rate=2e-2)
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].alora_invocation_tokens == [MASK]
    batch = first_batch(trainer)
    laid = trainer.build_noisy_batch(batch)
    length = batch["input_ids"].shape[1]
    assert torch.equal(laid["input_ids"][:, :length], batch["input_ids"])  # [x_0 | x_t]
    assert laid["model_kwargs"]["alora_offsets"] == [length] * batch["input_ids"].shape[0]
    trainer.train()
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, frozen[key]), name  # base weights bit for bit
    model.eval()
    with torch.no_grad():
        gated = trainer.forward_logits(model, laid)
        with model.disable_adapter():
            plain = trainer.forward_logits(model, {**laid, "model_kwargs": {}})
    assert torch.equal(gated[:, :length], plain[:, :length])  # clean half: the base model exactly
    assert (gated[:, length:] - plain[:, length:]).abs().max() > 1e-3  # the trained adapter acts on the noisy half
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "block_diffusion_config.json").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(vocab=len(tok) + 1, num_layers=2), str(tmp_path / "adapter"))
    with torch.no_grad():
        again = trainer.forward_logits(reloaded.eval(), laid)
    torch.testing.assert_close(again, gated, atol=1e-5, rtol=1e-5)


def test_r_isd_refuses_a_peft_model_and_a_non_lora_config(tmp_path):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    tok = byte_tokenizer()
    wrapped = get_peft_model(tiny_llama(vocab=len(tok) + 1, num_layers=2), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="base model"):
        make_trainer(tmp_path, model=wrapped, lora_gated=True)
    with pytest.raises(TypeError, match="LoraConfig"):
        make_trainer(tmp_path, lora_gated=True, peft_config=PromptTuningConfig(num_virtual_tokens=2,
                                                                               task_type="CAUSAL_LM"))


def test_r_isd_evaluates_repeatedly_under_gradient_checkpointing(tmp_path):
    """peft keeps aLoRA hooks on checkpointed layers until a backward; evaluation never runs one (Trainer turns
    checkpointing on at train() and leaves it on)."""
    trainer = make_trainer(tmp_path, lora_gated=True, lora_r=4, gradient_checkpointing=True, max_steps=1,
                           per_device_eval_batch_size=2)
    held_out = addition_dataset(4)
    before = trainer.evaluate(held_out)["eval_noisy_ce"]
    trainer.train()
    after = trainer.evaluate(held_out)["eval_noisy_ce"]  # two forwards, no backward
    assert trainer.evaluate(held_out)["eval_noisy_ce"] == pytest.approx(after)  # mask rate 1: deterministic
    assert after != pytest.approx(before)
    trainer.train()  # training still backpropagates through the checkpointed adapter afterwards
