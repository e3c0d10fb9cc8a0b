"""IHA on the real default model (SmolLM2-135M-Instruct; slow): the identity conversion is the original model."""

import copy

import pytest
import torch

from hf_fastslow.modeling.iha import IHAConfig, apply_iha

pytestmark = pytest.mark.slow


def test_identity_conversion_of_the_default_model(default_model):
    model, tok = default_model
    prompts = ["Write one sentence about the sea.", "List three prime numbers and explain why each is prime."]
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in prompts]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    assert not real.all(), "the batch must be left-padded"
    gen_kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model(**enc).logits
        ref_tokens = model.generate(**enc, **gen_kw)
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        # fp32 floor of this 30-layer model: two stock attention paths differ by about 1e-4 on logits up to ~40
        floor = (eager(**enc).logits - ref)[real].abs().max().item()
        iha = apply_iha(copy.deepcopy(model), IHAConfig(num_pseudo_heads=3, init_noise=0.0))
        delta = (iha(**enc).logits - ref)[real].abs().max().item()
        assert torch.equal(iha.generate(**enc, **gen_kw), ref_tokens)
    assert delta < max(1e-4, 2 * floor), f"IHA {delta:.2e} vs stock eager/SDPA floor {floor:.2e}"
    assert sum(p.numel() for n, p in iha.named_parameters() if ".iha." in n) == 30 * (9 * 9 * 3 + 2 * 3 * 9 * 3 + 9 * 3)
