"""The generation seam's public readers of `generate` internals return what `generate` itself uses (5.17 and 5.24)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, MambaConfig, MambaForCausalLM

from hf_fastslow.generation import speculative_generate
from hf_fastslow.generation.drafter import DraftModelDrafter
from hf_fastslow.integrations import generate_special_tokens, model_is_stateful, trl_pad_token_id, trl_tokenizer
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2, hidden=32, heads=2, kv_heads=1)


def _seen_by_custom_generate(model, **gen_kwargs):
    """(special tokens, the private tensors) as a `custom_generate` loop sees them inside `generate`."""
    seen = {}

    def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        seen["special"] = generate_special_tokens(generation_config)
        seen["eos"] = generation_config._eos_token_tensor
        seen["pad"] = generation_config._pad_token_tensor
        return input_ids

    model.generate(torch.tensor([[5, 6, 7]]), custom_generate=loop, max_new_tokens=2, **gen_kwargs)
    return seen


@pytest.mark.parametrize(
    "gen_kwargs, pad, eos",
    [
        ({}, 0, (1,)),  # the model's own config: pad 0, eos 1
        ({"eos_token_id": [9, 4]}, 0, (9, 4)),
        ({"pad_token_id": 11, "eos_token_id": 9}, 11, (9,)),
    ],
)
def test_special_tokens_inside_generate_are_generates_own(model, gen_kwargs, pad, eos):
    seen = _seen_by_custom_generate(model, **gen_kwargs)
    assert seen["special"] == (pad, eos)
    assert seen["special"].pad_token_id == int(seen["pad"].reshape(-1)[0])
    assert seen["special"].eos_token_id == tuple(seen["eos"].reshape(-1).tolist())


@pytest.fixture
def model_without_pad(model):
    config_pad = model.generation_config.pad_token_id
    model.generation_config.pad_token_id = None
    yield model
    model.generation_config.pad_token_id = config_pad


_IDS = torch.tensor([[0, 5, 17, 40], [33, 8, 9, 10]])
_MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])


def _early_eos(model) -> int:
    """A token row 0 of the batch generates greedily before row 1 ends: as EOS it finishes row 0 first."""
    free = model.generate(input_ids=_IDS, attention_mask=_MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    row0, row1 = free[0, 4:].tolist(), free[1, 4:].tolist()
    return next(t for t in row0[:3] if t not in row1)


def _filler_after_eos(out: torch.Tensor, eos: int) -> set[int]:
    row = out[0, _IDS.shape[1]:].tolist()
    end = row.index(eos) + 1
    assert end < len(row), "row 0 must finish first"
    return set(row[end:])


def test_pad_is_the_first_eos_when_generate_falls_back_and_generate_pads_with_it(model_without_pad):
    model = model_without_pad
    stop = _early_eos(model)
    kwargs = {"eos_token_id": [stop, 99]}
    seen = _seen_by_custom_generate(model, **kwargs)
    assert seen["special"] == (stop, (stop, 99))
    out = model.generate(input_ids=_IDS, attention_mask=_MASK, max_new_tokens=6, do_sample=False, **kwargs)
    assert _filler_after_eos(out, stop) == {seen["special"].pad_token_id}


def test_special_tokens_prefer_what_generate_prepared():
    # generate resolves them into private tensors on its own copy of the config; those win over the public fields.
    config = GenerationConfig(pad_token_id=None, eos_token_id=9)
    config._eos_token_tensor, config._pad_token_tensor = torch.tensor([4, 9]), torch.tensor(4)
    assert generate_special_tokens(config) == (4, (4, 9))


def test_special_tokens_outside_generate_read_the_public_fields():
    assert generate_special_tokens(GenerationConfig(eos_token_id=[5, 7])) == (None, (5, 7))
    assert generate_special_tokens(GenerationConfig(pad_token_id=3, eos_token_id=5)) == (3, (5,))
    assert generate_special_tokens(GenerationConfig()) == (None, ())


@pytest.mark.parametrize("pad", [13, None])
def test_speculative_generate_pads_like_generate(model_without_pad, pad):
    # A row that finishes first is filled with generate's pad id (the first EOS when no pad id is set).
    model = model_without_pad
    draft = tiny_llama(num_layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    stop = _early_eos(model)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": [stop, 99], "pad_token_id": pad}
    plain = model.generate(input_ids=_IDS, attention_mask=_MASK, **kwargs)
    spec = model.generate(input_ids=_IDS, attention_mask=_MASK, custom_generate=speculative_generate,
                          drafter=DraftModelDrafter(draft, max_draft_tokens=3), **kwargs)
    assert torch.equal(spec, plain)
    assert _filler_after_eos(spec, stop) == {stop if pad is None else pad}


def test_model_is_stateful_is_the_flag_generate_checks(model):
    assert model_is_stateful(model) is False
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1))
    assert model_is_stateful(mamba) is True
    assert model_is_stateful(mamba) == bool(type(mamba)._is_stateful)
    assert model_is_stateful(model) == bool(type(model)._is_stateful)
    with pytest.raises(ValueError, match="stateful"):
        mamba.generate(torch.tensor([[3, 4]]), custom_generate=speculative_generate,
                       drafter=DraftModelDrafter(tiny_llama(num_layers=1, hidden=16, heads=2, kv_heads=1, vocab=64)),
                       max_new_tokens=2)


def test_trl_tokenizer_is_the_trainers_text_tokenizer():
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert trl_tokenizer(SimpleNamespace(_tokenizer=tok, processing_class=None)) is tok
    assert trl_tokenizer(SimpleNamespace(processing_class=SimpleNamespace(tokenizer=tok))) is tok  # a processor
    assert trl_pad_token_id(SimpleNamespace(processing_class=tok)) == 7  # deprecated alias: pad, else EOS
