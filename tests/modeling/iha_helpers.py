"""Tiny models and the comparison the IHA tests share."""

import torch

from tests.conftest import tiny_llama

VOCAB = 128


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves the q/k/v biases at zero; make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                      pad_token_id=0)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"], pad_token_id=0, **kw)
    return Gemma3ForCausalLM(cfg).eval()


def tiny(kv_heads=2, heads=4, layers=2):
    return tiny_llama(num_layers=layers, hidden=64, heads=heads, kv_heads=kv_heads, vocab=VOCAB)


def padded_batch(length=11, pad=4, seed=1):
    """Two rows, the first left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask


@torch.no_grad()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def max_diff_on_tokens(a, b, mask):
    """Largest |a - b| over real (non-padding) positions."""
    return (a - b)[mask.bool()].abs().max().item()
