"""IHA: save/reload round trip, bad input (clear error, model unchanged), mixers as the only trainable parameters
(plain param group, HF Trainer, PEFT modules_to_save)."""

import json

import pytest
import torch

from hf_fastslow.modeling.iha import (
    IHA_MODULES_TO_SAVE,
    IHAConfig,
    IHAMixer,
    apply_iha,
    from_pretrained_iha,
    iha_param_group,
    iha_parameters,
    mark_only_iha_trainable,
)
from tests.modeling.iha_helpers import (
    VOCAB,
    logits,
    max_diff_on_tokens,
    padded_batch,
    tiny,
    tiny_gemma3,
    tiny_qwen2,
)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _assert_unchanged(model, snapshot):
    state, impl = snapshot
    assert not any(isinstance(m, IHAMixer) for m in model.modules())
    assert model.config._attn_implementation == impl
    assert not hasattr(model.config, "iha")
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


# -- save / reload ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("collapse, layers", [("per_head", "all"), ("global", [0])])
def test_save_and_reload_round_trip(tmp_path, collapse, layers):
    from transformers import LlamaForCausalLM

    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=3, collapse=collapse, layers=layers, init_noise=0.05))
    ids, mask = padded_batch()
    expected = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["iha"] == {"num_pseudo_heads": 3, "collapse": collapse, "init_noise": 0.05, "layers": layers,
                            "seed": 0}
    reloaded = from_pretrained_iha(tmp_path)
    assert type(reloaded) is LlamaForCausalLM
    assert reloaded.config._attn_implementation == "iha"
    for name, param in model.named_parameters():
        assert torch.equal(reloaded.get_parameter(name), param), name
    assert torch.equal(logits(reloaded, ids, mask), expected)
    # and it saves again as an IHA checkpoint
    reloaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["iha"]["collapse"] == collapse


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gemma3], ids=["qwen2", "gemma3"])
def test_save_and_reload_other_architectures(tmp_path, build):
    model = apply_iha(build(), IHAConfig(num_pseudo_heads=2, init_noise=0.05))
    ids, mask = padded_batch(length=10)
    expected = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_iha(tmp_path)
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded, ids, mask), expected)


def test_reload_refuses_a_plain_checkpoint(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an IHA checkpoint"):
        from_pretrained_iha(tmp_path)


def test_reload_refuses_a_checkpoint_without_mixer_weights(tmp_path):
    model = tiny()
    model.config.iha = IHAConfig(num_pseudo_heads=2).to_dict()  # settings claim IHA, the weights have no mixers
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lacks IHA weights"):
        from_pretrained_iha(tmp_path)


# -- bad input: clear error, nothing changed ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pseudo_heads=0), "num_pseudo_heads must be an integer >= 1"),
    (dict(num_pseudo_heads=-2), "num_pseudo_heads must be an integer >= 1"),
    (dict(num_pseudo_heads=2.0), "num_pseudo_heads must be an integer >= 1"),
    (dict(collapse="mean"), "collapse must be one of"),
    (dict(init_noise=-1.0), "init_noise must be a number >= 0"),
    (dict(layers=[]), "layers is empty"),
    (dict(layers="first"), "layers must be 'all' or a list"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IHAConfig(**kwargs)


def test_layers_out_of_range_leaves_model_unchanged():
    model = tiny()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: the model has 2 decoder layers"):
        apply_iha(model, IHAConfig(num_pseudo_heads=2, layers=[0, 5]))
    _assert_unchanged(model, snap)


def test_unsupported_architecture_leaves_model_unchanged():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64)).eval()
    snap = _snapshot(model)
    with pytest.raises(NotImplementedError, match=r"GPT2LMHeadModel \(model_type='gpt2'\) is not supported by IHA"):
        apply_iha(model, IHAConfig(num_pseudo_heads=2))
    _assert_unchanged(model, snap)


def test_softcapped_gemma_is_refused_naming_what_is_missing():
    model = tiny_gemma3(attn_logit_softcapping=50.0)
    snap = _snapshot(model)
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping=50.0.*no logit soft-capping"):
        apply_iha(model, IHAConfig(num_pseudo_heads=2))
    _assert_unchanged(model, snap)


def test_second_conversion_is_refused():
    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already IHA-converted"):
        apply_iha(model, IHAConfig(num_pseudo_heads=3))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.model.layers[0].self_attn.iha.num_pseudo_heads == 2


def test_wrong_config_type():
    with pytest.raises(TypeError, match="expects an IHAConfig"):
        apply_iha(tiny(), {"num_pseudo_heads": 2})


# -- training: the mixers alone ----------------------------------------------------------------------------------------
def test_mixers_only_training_step():
    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=1e-3))
    trainable = mark_only_iha_trainable(model)
    h, g, p, layers = 4, 2, 2, 2
    assert trainable == layers * (h * h * p + 2 * g * h * p + h * p)
    frozen = {n: t.clone() for n, t in model.named_parameters() if not t.requires_grad}
    mixers = {n: t.clone() for n, t in model.named_parameters() if t.requires_grad}
    assert all(".iha." in n for n in mixers)
    opt = torch.optim.AdamW([iha_param_group(model, lr=1e-2)])
    ids, mask = padded_batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(t, frozen[n]) for n, t in model.named_parameters() if n in frozen)
    assert all(not torch.equal(t, mixers[n]) for n, t in model.named_parameters() if n in mixers)


def test_helpers_refuse_an_unconverted_model():
    with pytest.raises(ValueError, match="no IHA mixers"):
        iha_param_group(tiny())
    with pytest.raises(ValueError, match="no IHA mixers"):
        mark_only_iha_trainable(tiny())


def test_hf_trainer_trains_only_the_mixers(tmp_path):
    Dataset = pytest.importorskip("datasets").Dataset  # the [train] extra; CI's transformers-5.17 venv lacks it
    from transformers import Trainer, TrainingArguments

    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=1e-3))
    mark_only_iha_trainable(model)
    before = {n: t.clone() for n, t in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, VOCAB, (8, 12), generator=g).tolist()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (".iha." in name), name


def test_peft_modules_to_save_trains_a_copy_of_the_mixers():
    from peft import LoraConfig, get_peft_model

    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=1e-3))
    ids, mask = padded_batch()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=IHA_MODULES_TO_SAVE))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".iha.modules_to_save." in n for n in trainable)
    assert all("lora_" in n or ".iha.modules_to_save." in n for n in trainable)
    before = logits(peft_model, ids, mask)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    peft_model.eval()
    # Only the trainable copy moved; the frozen original mixers are untouched, and the forward reads the copy.
    copies = [m for m in peft_model.modules() if isinstance(m, IHAMixer)]
    assert len(copies) == 4  # per layer: the original and the trainable copy
    assert max_diff_on_tokens(logits(peft_model, ids, mask), before, mask) > 1e-4
    with peft_model.disable_adapter():
        restored = logits(peft_model, ids, mask)
    base = tiny()
    apply_iha(base, IHAConfig(num_pseudo_heads=2, init_noise=1e-3))
    assert max_diff_on_tokens(restored, logits(base, ids, mask), mask) < 1e-5
    assert len(iha_parameters(peft_model)) == 16


def test_attention_function_refuses_softcap_and_mixer_refuses_bad_settings():
    from hf_fastslow.modeling.iha import iha_attention_forward

    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2))
    attn = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="softcap=5.0"):
        iha_attention_forward(attn, q, kv, kv, None, softcap=5.0)
    out, weights = iha_attention_forward(attn, q, kv, kv, None)
    assert out.shape == (1, 3, 4, 16) and weights is None
    with pytest.raises(ValueError, match="collapse must be one of"):
        IHAMixer(4, 2, 2, collapse="mean")
    with pytest.raises(ValueError, match="num_heads % num_kv_heads"):
        IHAMixer(4, 3, 2)
