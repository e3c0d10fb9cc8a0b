import functools
import math

import pytest
import torch
from transformers.cache_utils import DynamicCache

from hf_fastslow.generation.block_diffusion import BlockDiffusionDecoder, block_diffusion_generate
from hf_fastslow.generation.padding import left_pad
from hf_fastslow.generation.rcd import (
    RCDConfig,
    RCDDecoder,
    entropy_weighted_residual,
    inject_residual,
    input_embedding_scale,
    rcd_generate,
    residual_weight,
    soft_token_embedding,
)
from hf_fastslow.integrations.caches import cache_kwargs
from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion
from tests.conftest import tiny_llama

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


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------
MASK = 127
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def model_with(attention="block", block_size=4, logit_shift=True, dtype=torch.float32, layers=2, seed=0):
    model = tiny_llama(num_layers=layers, seed=seed).to(dtype)  # untied: input table != LM head
    return attach_block_diffusion(model, BlockDiffusionConfig(MASK, block_size, logit_shift, attention))


def tiny_gemma(seed=0):
    """A Gemma: its embedding module scales lookups by sqrt(hidden) (embed_scale)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    model = GemmaForCausalLM(cfg).eval()
    return attach_block_diffusion(model, BlockDiffusionConfig(MASK, 4, True, "block"))


def generate(model, fn, ids, mask=None, **kw):
    kw.setdefault("max_new_tokens", 12)
    return model.generate(ids, attention_mask=mask, custom_generate=fn, do_sample=False, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [None, 0.02])
def test_zero_weight_is_the_baseline_token_for_token(dtype, threshold):
    model = model_with(dtype=dtype)
    ids, mask = left_pad(ROWS, 0)
    kw = dict(threshold=threshold, eos_token_id=None, return_dict_in_generate=True)
    base = generate(model, block_diffusion_generate, ids, mask, **kw)
    for zero in ({"alpha_mode": "fixed", "fixed_alpha": 0.0}, {"t_res": 0.0}):
        out = generate(model, rcd_generate, ids, mask, **kw, **zero)
        assert torch.equal(out.sequences, base.sequences)
        assert torch.equal(out.num_forwards, base.num_forwards)
    # the "self" init's extra pass changes nothing either at zero weight; it costs one forward per block and row
    unfused = generate(model, block_diffusion_generate, ids, mask, fuse_commit=False, **kw)
    out = generate(model, rcd_generate, ids, mask, init="self", alpha_mode="fixed", fixed_alpha=0.0, **kw)
    assert torch.equal(out.sequences, unfused.sequences)
    assert out.num_forwards.tolist() == [f + 3 for f in unfused.num_forwards.tolist()]  # 12 tokens = 3 blocks of 4
    # ...and a non-zero weight does change the decoding (the test above is not vacuous)
    assert not torch.equal(generate(model, rcd_generate, ids, mask, **kw).sequences, base.sequences)


class Recording(RCDDecoder):
    """Records each denoising pass: the block, the masked slots, the forward kwargs and the aligned logits."""

    log: list

    def block_inputs(self, block_ids, masked):
        inputs = super().block_inputs(block_ids, masked)
        if bool(masked.any()):
            type(self).log.append({"block": self.block_index, "ids": block_ids.clone(), "masked": masked.clone(),
                                   "inputs": inputs})
        return inputs

    def after_step(self, logits, block_ids, masked):
        type(self).log.append({"block": self.block_index, "logits": logits.clone(), "masked_after": masked.clone()})
        super().after_step(logits, block_ids, masked)


def recorded(model, ids, mask, rcd_kw, **kw):
    Recording.log = []
    rcd_config = RCDConfig(**rcd_kw)
    out = block_diffusion_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None,
                                   decoder_cls=functools.partial(Recording, rcd=rcd_config), fuse_commit=False, **kw)
    return out, Recording.log


@pytest.mark.parametrize("which", ["llama_untied", "gemma_scaled"])
def test_each_pass_feeds_the_previous_steps_residual_to_masked_slots_only(which):
    model = model_with() if which == "llama_untied" else tiny_gemma()
    embedding = model.get_input_embeddings()
    scale = float(getattr(embedding, "embed_scale", 1.0))
    assert (scale > 1) == (which == "gemma_scaled")
    ids, mask = left_pad(ROWS, 0)
    _, log = recorded(model, ids, mask, {"t_res": 1.5}, threshold=None, steps=4)
    passes = [e for e in log if "inputs" in e]
    steps = [e for e in log if "logits" in e]
    assert len(passes) == len(steps) == 12  # 3 blocks x 4 steps
    table = embedding.weight.double()
    for k, seen in enumerate(passes):
        if k % 4 == 0:  # a block's first pass: zero init, the baseline's input (reset every block)
            assert set(seen["inputs"]) == {"input_ids"} and bool((seen["ids"] == MASK).all())
            continue
        previous = steps[k - 1]
        assert previous["block"] == seen["block"]
        embeds = seen["inputs"]["inputs_embeds"]
        plain = embedding(seen["ids"])
        masked = seen["masked"]
        assert torch.equal(masked, previous["masked_after"])
        assert torch.equal(embeds[~masked], plain[~masked])  # committed slots bit for bit
        p = torch.softmax(previous["logits"].double(), -1)
        tempered = torch.softmax(previous["logits"].double() / 1.5, -1)
        alpha = -(tempered * tempered.log()).sum(-1, keepdim=True) / math.log(p.shape[-1])
        expected = (1 - alpha) * table[MASK] * scale + alpha * (p @ table) * scale
        torch.testing.assert_close(embeds[masked].double(), expected[masked], rtol=1e-4, atol=1e-4)


def test_zero_init_leaves_the_first_step_logits_identical():
    model = model_with()
    ids, mask = left_pad(ROWS, 0)

    class Plain(BlockDiffusionDecoder):
        log: list = []

        def after_step(self, logits, block_ids, masked):
            type(self).log.append(logits.clone())

    block_diffusion_generate(model, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None,
                             decoder_cls=Plain, fuse_commit=False)
    _, log = recorded(model, ids, mask, {"init": "zero"})
    assert torch.equal([e for e in log if "logits" in e][0]["logits"], Plain.log[0])
    _, log = recorded(model, ids, mask, {"init": "dirichlet"})
    assert not torch.equal([e for e in log if "logits" in e][0]["logits"], Plain.log[0])


def test_prefix_cache_holds_only_committed_tokens():
    """Residuals only touch uncommitted passes: the cache after decoding is the KV of the committed tokens, as a
    plain causal forward over them computes it (float64, causal pattern: prefill and commits are causal)."""
    model = model_with(attention="causal", dtype=torch.float64)
    ids, mask = left_pad(ROWS, 0)
    for fn, extra in ((rcd_generate, {"init": "self"}), (rcd_generate, {}), (block_diffusion_generate, {})):
        cache = DynamicCache()
        out = generate(model, fn, ids, mask, threshold=0.05, eos_token_id=None, **extra, **cache_kwargs(model, cache))
        committed = out[:, : cache.get_seq_length()]
        assert committed.shape[1] == ids.shape[1] + 8  # the last block is never committed
        full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], dim=1)
        ref = DynamicCache()
        model(input_ids=committed, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
              use_cache=True, **cache_kwargs(model, ref))
        real = full_mask.bool()
        for layer, ref_layer in zip(cache.layers, ref.layers):
            for r in range(3):
                torch.testing.assert_close(layer.keys[r][:, real[r]], ref_layer.keys[r][:, real[r]], rtol=0, atol=1e-9)
                torch.testing.assert_close(layer.values[r][:, real[r]], ref_layer.values[r][:, real[r]], rtol=0,
                                           atol=1e-9)


def test_ref_init_uses_the_reference_and_counts_its_passes():
    model = model_with()
    ref = model_with(layers=1, seed=5)
    ids, mask = left_pad(ROWS, 0)
    kw = dict(threshold=0.02, eos_token_id=None, return_dict_in_generate=True)
    out = generate(model, rcd_generate, ids, mask, init="ref", ref_model=ref, **kw)
    unfused = generate(model, block_diffusion_generate, ids, mask, fuse_commit=False, **kw)
    zero_weight = generate(model, rcd_generate, ids, mask, init="ref", ref_model=ref, alpha_mode="fixed",
                           fixed_alpha=0.0, **kw)
    assert torch.equal(zero_weight.sequences, unfused.sequences)
    assert out.num_forwards.tolist() == [f + 3 for f in unfused.num_forwards.tolist()]
    # one reference pass per block, over the whole sequence so far plus the masked block
    calls = []
    handle = ref.register_forward_hook(lambda mod, args, output: calls.append(output.logits.shape))
    try:
        generate(model, rcd_generate, ids, mask, init="ref", ref_model=ref, **kw)
    finally:
        handle.remove()
    assert [c[1] for c in calls] == [ids.shape[1] + 4 * k for k in (1, 2, 3)]


def test_bad_input_is_refused():
    model = model_with()
    ids = torch.tensor([ROWS[0]])
    with pytest.raises(ValueError, match="ref_model"):
        generate(model, rcd_generate, ids, init="ref")
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, rcd_generate, ids, init="ref", ref_model=tiny_llama(num_layers=1, vocab=130))
    other_mask = attach_block_diffusion(tiny_llama(num_layers=1), BlockDiffusionConfig(MASK - 1, 4))
    with pytest.raises(ValueError, match="mask token"):
        generate(model, rcd_generate, ids, init="ref", ref_model=other_mask)
    with pytest.raises(ValueError, match="init"):
        generate(model, rcd_generate, ids, init="warm")
    bare = tiny_llama(num_layers=1)
    with pytest.raises(ValueError, match="mask token"):
        generate(bare, rcd_generate, ids, block_size=4)
