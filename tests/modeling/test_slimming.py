"""ViT-Slim masks and slicing for transformers ViT and Llama (issue 15 item 2)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, count_params_flops, select_units, slice_model
from tests.conftest import tiny_llama


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, num_labels=3, **kw)
    return ViTForImageClassification(cfg).eval()


def randomize(masks, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.copy_(torch.rand(p.shape, generator=g).to(p) * 1.5 + 0.1)


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gran,backend", [("head", "hook"), ("dim", "hook"), ("head", "ia3"), (None, "ia3")])
def test_vit_masks_at_one_are_the_original(gran, backend):
    model = tiny_vit()
    ref = model(PIXELS).logits
    masks = attach_slim_masks(model, SlimConfig(attn_granularity=gran, mlp_backend=backend))
    assert torch.equal(model(PIXELS).logits, ref)
    assert len(masks.groups) == (4 if gran else 2)


def test_llama_masks_at_one_are_the_original():
    model = tiny_llama()
    ref = model(IDS).logits
    attach_slim_masks(model, SlimConfig(attn_granularity="kv_group"))
    assert torch.equal(model(IDS).logits, ref)


def test_budget_one_slices_nothing_and_is_bitwise():
    model = tiny_vit()
    ref = model(PIXELS).logits
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="head"))
    randomize(masks)
    masks.binarize(attn_budget=1.0, mlp_budget=1.0)
    child = slice_model(model, masks)
    assert torch.equal(child(PIXELS).logits, ref)


@pytest.mark.parametrize("gran,backend,rescale", [("head", "hook", "reset"), ("dim", "hook", "keep"),
                                                  ("head", "ia3", "keep"), ("dim", "ia3", "reset")])
def test_vit_slicing_equals_masked_and_reloads(tmp_path, gran, backend, rescale):
    model = tiny_vit()
    masks = attach_slim_masks(model, SlimConfig(attn_granularity=gran, mlp_backend=backend, rescale=rescale))
    randomize(masks)
    kept = masks.binarize(attn_budget=0.5, mlp_budget=0.25)
    assert kept == {"attn": 0.5, "mlp": 0.25}
    masked = model(PIXELS).logits
    child = slice_model(model, masks)
    assert type(child).__name__ == "SlimViTForImageClassification"
    out = child(PIXELS).logits
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    layers = child.vit.layers  # global threshold: widths differ per layer, totals follow the budget
    if gran == "head":
        assert sum(layer.attention.num_attention_heads for layer in layers) == 4
        assert all(layer.attention.q_proj.out_features == 8 * layer.attention.num_attention_heads for layer in layers)
    else:
        assert sum(layer.attention.head_dim for layer in layers) == 8
        assert all(layer.attention.scaling == 8 ** -0.5 for layer in layers)  # the original softmax scale is kept
    assert sum(layer.mlp.fc1.out_features for layer in layers) == 24
    child.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "SlimViTForImageClassification"
    assert torch.equal(reloaded(PIXELS).logits, out)


def test_vit_param_count_matches_the_accounting_formula():
    model = tiny_vit()
    dense = sum(p.numel() for p in model.parameters())
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="dim"))
    randomize(masks)
    masks.binarize(attn_budget=0.5, mlp_budget=0.5)
    child = slice_model(model, masks)
    d, n_layers = 32, 2
    removed = 0
    for layer in child.vit.layers:
        a = layer.attention.num_attention_heads * layer.attention.head_dim
        a_ff = layer.mlp.fc1.out_features
        removed += (3 * d * 32 + 3 * 32 + 32 * d) - (3 * d * a + 3 * a + a * d)  # card: 3da + 3a + ad (+ d bias)
        removed += (2 * d * 48 + 48) - (2 * d * a_ff + a_ff)
    assert sum(p.numel() for p in child.parameters()) == dense - removed
    assert n_layers == len(child.vit.layers)


def test_zeroed_kv_group_equals_removing_its_query_heads_by_hand():
    model = tiny_llama()  # 4 query heads, 2 KV groups, head_dim 16
    reference = copy.deepcopy(model)
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="kv_group", mlp=False))
    with torch.no_grad():
        masks.groups[1].param.copy_(torch.tensor([1.0, 0.0]))  # layer 1: drop KV group 1 (query heads 2 and 3)
        reference.model.layers[1].self_attn.o_proj.weight[:, 32:] = 0
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-6, rtol=0)
    masks.binarize(attn_budget=0.5)
    masked = model(IDS).logits
    child = slice_model(model, masks)
    for layer in child.model.layers:  # GQA tie: every kept KV head keeps its 2 query heads
        attn = layer.self_attn
        assert attn.q_proj.out_features == 2 * attn.k_proj.out_features == 2 * attn.v_proj.out_features
    torch.testing.assert_close(child(IDS).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gran", ["kv_group", None])
def test_llama_slicing_reloads_and_generates(tmp_path, gran):
    model = tiny_llama()
    masks = attach_slim_masks(model, SlimConfig(attn_granularity=gran, rescale="keep"))
    randomize(masks)
    masks.binarize(budget=0.5)
    masked = model(IDS).logits
    child = slice_model(model, masks)
    out = child(IDS).logits
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    assert sum(layer.mlp.down_proj.in_features for layer in child.model.layers) == 3 * 64
    child.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "SlimLlamaForCausalLM"
    assert torch.equal(reloaded(IDS).logits, out)
    gen = reloaded.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, child.generate(IDS[:1], max_new_tokens=4, do_sample=False))


def test_rope_and_gqa_ties_are_enforced():
    with pytest.raises(ValueError, match="RoPE"):
        attach_slim_masks(tiny_llama(), SlimConfig(attn_granularity="dim"))
    with pytest.raises(ValueError, match="GQA"):
        attach_slim_masks(tiny_llama(), SlimConfig(attn_granularity="head"))
    masks = attach_slim_masks(tiny_llama(kv_heads=4), SlimConfig(attn_granularity="head"))  # MHA: head == group
    assert [g.units for g in masks.groups if g.kind == "attn"] == [4, 4, 4]


def test_select_units_thresholds_on_hand_built_scores():
    scores = [torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.05, 0.04, 0.03, 0.02])]
    # global, 50 %: the 4 best overall are all in layer 0, but layer 1 keeps its best unit
    assert [k.tolist() for k in select_units(scores, 0.5, "global")] == [[0, 1, 2], [0]]
    assert [k.tolist() for k in select_units(scores, 0.5, "layerwise")] == [[0, 1], [0, 1]]
    assert [k.tolist() for k in select_units(scores, 0.5, "floor", floor=0.5)] == [[0, 1], [0, 1]]
    assert [k.tolist() for k in select_units(scores, 0.01, "global")] == [[0], [0]]
    big = [torch.rand(100, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for b in (0.75, 0.5, 0.25, 0.1):
        assert abs(sum(len(k) for k in select_units(big, b)) - b * 300) <= 1
    ties = [torch.ones(4)]
    assert select_units(ties, 0.5)[0].tolist() == [0, 1]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_budgets_raise(bad):
    masks = attach_slim_masks(tiny_vit(), SlimConfig())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        masks.binarize(mlp_budget=bad)


def test_clear_errors():
    with pytest.raises(TypeError, match="cannot prune Sequential"):
        attach_slim_masks(torch.nn.Sequential(torch.nn.Linear(4, 4)), SlimConfig())
    model = tiny_vit()
    with pytest.raises(ValueError, match="kv_group"):
        attach_slim_masks(model, SlimConfig(attn_granularity="kv_group"))
    masks = attach_slim_masks(model, SlimConfig(attn_granularity=None))
    with pytest.raises(ValueError, match="binarize the masks first"):
        slice_model(model, masks)
    with pytest.raises(ValueError, match="no attn masks"):
        masks.binarize(attn_budget=0.5)
    with pytest.raises(ValueError, match="already carries"):
        attach_slim_masks(model, SlimConfig())
    with pytest.raises(ValueError, match="threshold"):
        SlimConfig(threshold="median")


def test_l1_gradient_is_w_sign_zeta():
    masks = attach_slim_masks(tiny_vit(), SlimConfig(attn_granularity="head", w_attn=0.3, w_mlp=0.2))
    with torch.no_grad():
        masks.mask_parameters()[0].copy_(torch.tensor([1.0, -2.0, 0.5, -0.1]))
    grads = torch.autograd.grad(masks.penalty(), masks.mask_parameters())
    assert torch.equal(grads[0], 0.3 * torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert torch.equal(grads[1], torch.full((48,), 0.2))


def test_count_params_flops_by_hand():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    got = count_params_flops(lin, torch.randn(3, 8))
    assert got == {"params": 8 * 16 + 16 + 16 * 4 + 4, "flops": 2 * 3 * (8 * 16 + 16 * 4)}
    model = tiny_vit()
    dense = count_params_flops(model, PIXELS)
    masks = attach_slim_masks(model, SlimConfig())
    randomize(masks)
    masks.binarize(budget=0.5)
    small = count_params_flops(slice_model(model, masks), PIXELS)
    assert small["params"] < dense["params"] and small["flops"] < dense["flops"]
