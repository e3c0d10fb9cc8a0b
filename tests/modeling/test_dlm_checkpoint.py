"""save_dlm_checkpoint: a plain `from_pretrained` (no trust_remote_code) restores the weights, the BlockDiffusionConfig,
bidirectional attention and the tokenizer; the README is a Hub model card with the figures; GGUF quantizers are
dropped; models without a BlockDiffusionConfig are refused."""

from __future__ import annotations

import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, block_diffusion_config
from hf_fastslow.modeling.dlm_checkpoint import save_dlm_checkpoint
from tests.conftest import byte_tokenizer, tiny_llama

IDS = torch.tensor([[5, 9, 30, 41, 7, 8, 100, 12]])
FIGURES = {"accuracy (addition, 3 digits)": 0.875, "tokens per forward": 2.25, "training tokens": 120000}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_restores_model_config_and_tokenizer(tmp_path):
    import pytest

    model = tiny_llama(num_layers=2, vocab=259)
    bd = BlockDiffusionConfig(mask_token_id=258, block_size=4, logit_shift=True, attention="block")
    attach_block_diffusion(model, bd)
    tok = byte_tokenizer()
    save_dlm_checkpoint(model, tok, tmp_path, figures=FIGURES, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                        method="i-dlm")
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert block_diffusion_config(again) == bd
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2("hello 12").input_ids == tok("hello 12").input_ids

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf_fastslow"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"hf_fastslow", "i-dlm", "diffusion-lm", "block-diffusion"} <= set(card.data.tags)
    assert "| accuracy (addition, 3 digits) | 0.875 |" in card.text and "| training tokens | 120000 |" in card.text
    assert "mask token id 258" in card.text and "block size 4" in card.text and "shifted logits" in card.text
    with pytest.raises(TypeError, match="figures must be a mapping"):
        save_dlm_checkpoint(model, tok, tmp_path / "x", figures=[0.5], base_model=None, method="i-dlm")


def test_decoding_after_reload_is_unchanged(tmp_path):
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate

    model = attach_block_diffusion(tiny_llama(num_layers=2).double(), BlockDiffusionConfig(127, 4, True, "block"))
    save_dlm_checkpoint(model, None, tmp_path, figures={}, base_model=None, method="block-diffusion")
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    kwargs = dict(custom_generate=block_diffusion_generate, steps=2, threshold=0.5, max_new_tokens=8, do_sample=False)
    assert torch.equal(again.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


def test_loaded_llada_saves_as_bidirectional_llama(tmp_path):
    """A LLaDA checkpoint loaded through the key map saves under Llama names and stays bidirectional after reload."""
    from hf_fastslow.modeling.dlm_loading import load_as_hf
    from tests.modeling.test_dlm_loading import LLADA_CONFIG, _write, llada_reference, llada_tensors

    tensors = llada_tensors()
    _write(tmp_path / "llada", LLADA_CONFIG, tensors)
    model, bd = load_as_hf(tmp_path / "llada")
    save_dlm_checkpoint(model, None, tmp_path / "out", figures={"top-1 vs remote code": "not measured"},
                        base_model="GSAI-ML/LLaDA-8B-Instruct", method="llada")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.is_causal is False and block_diffusion_config(again) == bd
    torch.testing.assert_close(_logits(again), llada_reference(IDS, tensors))
    assert "whole sequence" in ModelCard.load(tmp_path / "out" / "README.md").text


def test_gguf_quantizer_is_dropped(tmp_path):
    class GGUFQuantizerStandIn:  # a gguf_file= load leaves dense weights behind a quantizer that cannot save
        pass

    model = attach_block_diffusion(tiny_llama(num_layers=1), BlockDiffusionConfig(127, 4, True, "causal"))
    model.hf_quantizer = GGUFQuantizerStandIn()
    model.config.quantization_config = {"quant_method": "gguf"}
    save_dlm_checkpoint(model, None, tmp_path, figures={}, base_model=None, method="i-dlm")
    assert model.hf_quantizer is None
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(again.config, "quantization_config", None) is None
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)


def test_refuses_a_model_without_block_diffusion_config(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no BlockDiffusionConfig"):
        save_dlm_checkpoint(tiny_llama(num_layers=1), None, tmp_path, figures={}, base_model=None, method="x")
    assert not (tmp_path / "config.json").exists()
