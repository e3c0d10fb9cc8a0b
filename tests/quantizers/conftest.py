"""Shared fixtures of the XQuant tests: the small config, the tiny GQA Llama and the tiny Gemma-3 (sliding layers)."""

import pytest
import torch

from hf_fastslow import XQuantConfig
from tests.conftest import tiny_llama


def small_cfg(**kw):
    base = dict(group_size=8, residual_length=16, base_layer=1, high_precision_layers=1)
    base.update(kw)
    return XQuantConfig(**base)


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=128, max_position_embeddings=256,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gqa_model():
    # d = 64, d_kv = 16: latent mode is 4x narrower than X, CL deltas live in a 32-dim subspace
    return tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=0)

