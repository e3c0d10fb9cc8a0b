"""The token-id helpers every batched `generate` caller shares: pad id, left padding, cutting at EOS."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from hf_fastslow.generation.padding import cut_at_eos, left_pad, pad_token_id, token_ids
from tests.conftest import byte_tokenizer, tiny_llama


# --- pad_token_id ---------------------------------------------------------------------------------------------------
def test_pad_token_id_prefers_the_pad_token_even_when_it_is_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=1)) == 0
    assert pad_token_id(byte_tokenizer()) == 0


def test_pad_token_id_falls_back_to_eos_without_a_pad_token():
    tok = byte_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == tok.eos_token_id == 1


def test_pad_token_id_takes_the_first_of_several_eos_ids():
    assert pad_token_id(GenerationConfig(eos_token_id=[7, 3, 9])) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=torch.tensor([5, 6]))) == 5


def test_pad_token_id_default_only_without_pad_and_eos():
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) is None
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=()), default=0) == 0
    assert pad_token_id(SimpleNamespace(), default=4) == 4
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2), default=4) == 2


def test_pad_token_id_of_a_model_config():
    assert pad_token_id(tiny_llama(num_layers=1, hidden=16, heads=2, kv_heads=1).config) == 0


def test_token_ids_accepts_every_form_an_id_comes_in():
    assert token_ids(None) == ()
    assert token_ids(3) == (3,)
    assert token_ids(np.int64(3)) == (3,)
    assert token_ids([4, 2]) == (4, 2)
    assert token_ids(torch.tensor([[4], [2]])) == (4, 2)
    assert token_ids(torch.tensor(9)) == (9,)
    assert all(type(t) is int for t in token_ids(torch.tensor([1, 2])))
    assert token_ids([None, 3]) == (3,)  # a tokenizer without EOS gives {None}: it matches no token


# --- left_pad -------------------------------------------------------------------------------------------------------
def test_left_pad_right_aligns_rows_behind_pad_ids():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_pad_matches_the_tokenizers_own_left_padding():
    tok = byte_tokenizer()
    rows = [tok("a longer prompt")["input_ids"], tok("hi")["input_ids"], tok("mid size")["input_ids"]]
    ids, mask = left_pad(rows, pad_token_id(tok))
    ref = tok.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_left_pad_empty_rows_and_empty_batch():
    ids, mask = left_pad([[], [3, 4]], pad_id=1)
    assert ids.tolist() == [[1, 1], [3, 4]] and mask.tolist() == [[0, 0], [1, 1]]
    ids, mask = left_pad([[], []], pad_id=1)
    assert ids.shape == mask.shape == (2, 0) and ids.dtype == torch.long
    ids, mask = left_pad([], pad_id=1)
    assert ids.shape == mask.shape == (0, 0)


def test_left_pad_accepts_tuples_and_tensors_and_places_on_device():
    ids, mask = left_pad([(1, 2), torch.tensor([3])], pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.device.type == "cpu"


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_llama(num_layers=2, hidden=32, heads=2, kv_heads=1)
    rows = [[5, 17, 40, 9, 22], [33, 8], [60, 61, 62]]
    ids, mask = left_pad(rows, pad_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert batched[i, ids.shape[1]:].tolist() == alone[0, len(row):].tolist()


# --- cut_at_eos -----------------------------------------------------------------------------------------------------
def test_cut_at_eos_keeps_the_first_eos_and_drops_the_rest():
    assert cut_at_eos([5, 6, 1, 0, 0], 1) == [5, 6, 1]
    assert cut_at_eos([5, 1, 6, 1], [1]) == [5, 1]


def test_cut_at_eos_at_position_zero():
    assert cut_at_eos([1, 5, 6], 1) == [1]


def test_cut_at_eos_without_eos_keeps_everything():
    assert cut_at_eos([5, 6, 7], 1) == [5, 6, 7]
    assert cut_at_eos([5, 6, 7], None) == [5, 6, 7]
    assert cut_at_eos([5, 6, 7], []) == [5, 6, 7]
    assert cut_at_eos([], 1) == []
    assert cut_at_eos([5, 6, 7], {None}) == [5, 6, 7]


def test_cut_at_eos_with_several_eos_ids_stops_at_whichever_comes_first():
    assert cut_at_eos([4, 9, 3, 7], [7, 3]) == [4, 9, 3]
    assert cut_at_eos([4, 9, 3, 7], {7, 9}) == [4, 9]
    assert cut_at_eos([4, 9, 3, 7], torch.tensor([7])) == [4, 9, 3, 7]


def test_cut_at_eos_returns_a_new_list():
    ids = [5, 6]
    out = cut_at_eos(ids, 1)
    assert out == ids and out is not ids


@pytest.mark.parametrize("eos", [1, [1, 2]])
def test_cut_at_eos_on_generate_output(eos):
    model = tiny_llama(num_layers=2, hidden=32, heads=2, kv_heads=1)
    prompt = torch.tensor([[5, 17, 40]])
    free = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    stop = free[2]  # make the third new token an EOS: generate stops there and pads the row
    ids, mask = left_pad([[5, 17, 40], [33, 8, 9, 10]], pad_id=0)
    eos_ids = [stop] + ([99] if isinstance(eos, list) else [])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=eos_ids)
    cut = cut_at_eos(out[0, ids.shape[1]:].tolist(), eos_ids if isinstance(eos, list) else stop)
    assert cut == free[: free.index(stop) + 1]
