import math

import pytest
import torch

from hf_fastslow.generation.rcd import (
    RCDConfig,
    entropy_weighted_residual,
    inject_residual,
    input_embedding_scale,
    residual_weight,
    soft_token_embedding,
)

V, D = 128, 64


# ---------------------------------------------------------------------------------------------------------------
# residual state: alpha and delta
# ---------------------------------------------------------------------------------------------------------------
def test_alpha_is_in_unit_interval_one_for_uniform_and_zero_for_one_hot():
    logits = torch.randn(3, 5, V) * 4
    alpha = residual_weight(logits)
    assert alpha.dtype == torch.float32 and alpha.shape == (3, 5)
    assert (alpha >= 0).all() and (alpha <= 1).all()
    assert residual_weight(torch.zeros(2, V)).sub(1).abs().max() < 1e-6
    one_hot = torch.full((2, V), -1e4)
    one_hot[:, 7] = 1e4
    assert residual_weight(one_hot).max() < 1e-6
    # -inf logits (a processor's ban) are no NaN
    banned = torch.randn(2, V)
    banned[:, :10] = float("-inf")
    assert torch.isfinite(residual_weight(banned)).all()


def test_alpha_is_the_normalized_entropy_of_the_tempered_distribution():
    logits = torch.randn(4, V, dtype=torch.float64) * 3
    for t_res in (0.5, 1.0, 2.0):
        p = torch.softmax(logits / t_res, -1)
        expected = -(p * p.log()).sum(-1) / math.log(V)
        torch.testing.assert_close(residual_weight(logits, t_res=t_res).double(), expected, rtol=0, atol=1e-6)
    assert residual_weight(logits, t_res=0.0).eq(0).all()
    # log V comes from the logits width, not from a table size
    wide = torch.zeros(1, 200)
    assert abs(residual_weight(wide).item() - 1.0) < 1e-6


def test_alpha_modes_confidence_and_fixed():
    logits = torch.randn(4, V) * 3
    conf = residual_weight(logits, "confidence")
    torch.testing.assert_close(conf, 1 - torch.softmax(logits, -1).max(-1).values)
    assert residual_weight(logits, "fixed", fixed_alpha=0.25).eq(0.25).all()
    with pytest.raises(ValueError, match="alpha_mode"):
        residual_weight(logits, "bogus")


def test_delta_is_e_transpose_p_and_topk_with_k_equal_v_is_dense():
    logits = torch.randn(2, 3, V) * 2
    table = torch.randn(V, D)
    delta, alpha = entropy_weighted_residual(logits, table)
    reference = torch.einsum("bnv,vd->bnd", torch.softmax(logits.double(), -1), table.double())
    torch.testing.assert_close(delta.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha, residual_weight(logits))
    dense_k, _ = entropy_weighted_residual(logits, table, topk=V)
    torch.testing.assert_close(dense_k, delta, rtol=1e-5, atol=1e-5)
    sparse, _ = entropy_weighted_residual(logits, table, topk=4)
    p = torch.softmax(logits, -1)
    top_p, top_i = p.topk(4, -1)
    expected = ((top_p / top_p.sum(-1, keepdim=True)).unsqueeze(-1) * table[top_i]).sum(-2)
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)


def test_temper_delta_uses_the_tempered_distribution_only_when_asked():
    logits = torch.randn(2, V) * 3
    table = torch.randn(V, D)
    plain, a1 = entropy_weighted_residual(logits, table, t_res=2.0)
    tempered, a2 = entropy_weighted_residual(logits, table, t_res=2.0, temper_delta=True)
    torch.testing.assert_close(plain, torch.softmax(logits, -1) @ table)
    torch.testing.assert_close(tempered, torch.softmax(logits / 2, -1) @ table)
    torch.testing.assert_close(a1, a2)


def test_delta_carries_the_embedding_scale_and_uses_the_first_rows_of_a_padded_table():
    class ScaledEmbedding(torch.nn.Embedding):
        def __init__(self, n, d, scale):
            super().__init__(n, d)
            self.embed_scale = torch.nn.Buffer(torch.tensor(scale), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    emb = ScaledEmbedding(V + 16, D, 8.0)  # table padded beyond the logits width
    assert input_embedding_scale(emb) == 8.0
    assert input_embedding_scale(torch.nn.Embedding(4, 2)) == 1.0
    one_hot = torch.full((1, V), -1e4)
    one_hot[0, 5] = 1e4
    delta = soft_token_embedding(torch.softmax(one_hot, -1), emb.weight, embed_scale=input_embedding_scale(emb))
    # a one-hot soft token is exactly the module's lookup of that token
    torch.testing.assert_close(delta, emb(torch.tensor([5])))
    with pytest.raises(ValueError, match="rows"):
        soft_token_embedding(torch.softmax(torch.zeros(1, V + 17), -1), emb.weight)


# ---------------------------------------------------------------------------------------------------------------
# injection
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_injection_touches_only_masked_slots(dtype):
    embeds = torch.randn(2, 6, D).to(dtype)
    delta = torch.randn(2, 6, D).to(dtype)
    alpha = torch.rand(2, 6)
    masked = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    out = inject_residual(embeds, delta, alpha, masked)
    assert out.dtype == dtype
    assert torch.equal(out[~masked], embeds[~masked])  # bitwise
    a = alpha[masked].unsqueeze(-1)
    expected = ((1 - a) * embeds[masked].float() + a * delta[masked].float()).to(dtype)
    assert torch.equal(out[masked], expected)
    # alpha = 0 leaves every slot bit for bit as it was
    assert torch.equal(inject_residual(embeds, delta, torch.zeros(2, 6), masked), embeds)


def test_config_validates_and_pops_its_fields():
    kwargs = {"t_res": 0.5, "init": "self", "max_new_tokens": 3}
    cfg = RCDConfig.from_kwargs(kwargs)
    assert (cfg.t_res, cfg.init) == (0.5, "self") and kwargs == {"max_new_tokens": 3}
    for bad in ({"init": "warm"}, {"alpha_mode": "x"}, {"t_res": -1}, {"fixed_alpha": 2}, {"residual_topk": 0}):
        with pytest.raises(ValueError):
            RCDConfig(**bad)
