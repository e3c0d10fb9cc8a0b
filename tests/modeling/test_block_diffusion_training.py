import pytest
import torch

from hf_fastslow.modeling.block_diffusion_training import (
    additive_attention_mask,
    block_ids,
    diffusion_targets,
    noisy_inputs,
    sequence_positions,
    single_sequence_mask,
    split_block_first_targets,
    training_mask_2l,
    two_half_position_ids,
)
from tests.conftest import tiny_llama


def reference_mask_2l(length, b, pattern, real=None, clean_first=False, blocks=None):
    """Element-by-element statement of the rules (the card's list), one query/key pair at a time. `blocks`: the block
    id of each slot (default: the absolute grid pos // b)."""
    real = [1] * length if real is None else list(real)
    pos, p = [], 0
    for r in real:
        pos.append(p if r else 0)
        p += int(r)
    blocks = [q // b for q in pos] if blocks is None else list(blocks)
    out = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for qi in range(2 * length):
        for ki in range(2 * length):
            q_noisy = (qi < length) != clean_first
            k_noisy = (ki < length) != clean_first
            i, j = qi % length, ki % length
            if not real[i]:
                out[qi, ki] = qi == ki
                continue
            if not real[j]:
                continue
            bi, bj = blocks[i], blocks[j]
            if q_noisy and k_noisy:
                allowed = bi == bj and (pattern == "bd3" or pos[j] <= pos[i])
            elif q_noisy:
                allowed = bj < bi
            elif k_noisy:
                allowed = False
            else:
                allowed = bj <= bi if pattern == "bd3" else pos[j] <= pos[i]
            out[qi, ki] = allowed
    return out


@pytest.mark.parametrize("pattern", ["bd3", "idlm"])
@pytest.mark.parametrize("b", [1, 2, 3, 4])
@pytest.mark.parametrize("clean_first", [False, True])
def test_mask_matches_element_reference(pattern, b, clean_first):
    length = 7  # not a multiple of 2, 3 or 4
    got = training_mask_2l(length, b, pattern, clean_first=clean_first)
    assert got.shape == (1, 1, 2 * length, 2 * length) and got.dtype == torch.bool
    assert torch.equal(got[0, 0], reference_mask_2l(length, b, pattern, clean_first=clean_first))


@pytest.mark.parametrize("pattern", ["bd3", "idlm"])
@pytest.mark.parametrize("b", [1, 2, 3])
def test_mask_with_left_and_right_padding_matches_reference(pattern, b):
    padding = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    for clean_first in (False, True):
        got = training_mask_2l(7, b, pattern, padding_mask=padding, clean_first=clean_first)
        assert got.shape == (3, 1, 14, 14)
        for row in range(3):
            ref = reference_mask_2l(7, b, pattern, padding[row].tolist(), clean_first)
            assert torch.equal(got[row, 0], ref), (row, clean_first)
        assert got.any(-1).all()  # every query row sees something: no NaN softmax rows


def test_idlm_block_one_is_noisy_sees_earlier_clean_and_itself():
    length = 6
    m = training_mask_2l(length, 1, "idlm")[0, 0]
    for i in range(length):
        assert m[i, :length].nonzero().flatten().tolist() == [i]  # noisy: only itself
        assert m[i, length:].nonzero().flatten().tolist() == list(range(i))  # clean: strictly earlier
        assert not m[length + i, :length].any()  # clean never sees noisy
        assert m[length + i, length:].nonzero().flatten().tolist() == list(range(i + 1))  # plain causal


def test_positions_are_duplicated_and_follow_real_tokens():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    pos = two_half_position_ids(5, padding)
    assert pos.tolist() == [[0, 0, 0, 1, 2] * 2, [0, 1, 2, 3, 0] * 2]
    assert sequence_positions(4).tolist() == [[0, 1, 2, 3]]


def test_single_sequence_mask_and_errors():
    padding = torch.tensor([[1, 1, 0]])
    m = single_sequence_mask(3, "bidirectional", padding)[0, 0]
    assert m.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="pattern"):
        training_mask_2l(4, 2, "causal")
    with pytest.raises(ValueError, match="block_size"):
        training_mask_2l(4, 0, "bd3")


def test_noising_never_masks_prompt_or_padding_and_follows_the_schedule():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (64, 40), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100  # prompt
    labels[:, 35:] = -100  # padding
    x_t, masked, p = noisy_inputs(ids, labels, 127, eps=1e-3, generator=gen)
    assert not masked[:, :10].any() and not masked[:, 35:].any()
    assert torch.equal(x_t[~masked], ids[~masked]) and (x_t[masked] == 127).all()
    assert ((p >= 1e-3) & (p <= 1)).all()
    # the masked fraction of each row's 25 response tokens tracks its p_mask
    frac = masked[:, 10:35].float().mean(-1)
    assert (frac - p).abs().mean() < 0.1
    _, all_masked, p1 = noisy_inputs(ids, labels, 127, mask_rate=1.0)
    assert torch.equal(all_masked, labels != -100) and (p1 == 1).all()


def test_targets_shift_and_no_shift():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    masked = torch.tensor([[False, False, True, False, True]])
    noisy, clean = diffusion_targets(ids, labels, masked, logit_shift=True)
    assert noisy.tolist() == [[-100, 7, -100, 9, -100]]
    assert clean.tolist() == [[-100, 7, 8, 9, -100]]
    noisy, clean = diffusion_targets(ids, labels, masked, logit_shift=False)
    assert noisy.tolist() == [[-100, -100, 7, -100, 9]] and (clean == -100).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pattern", ["bd3", "idlm"])
def test_two_half_forward_equals_each_block_decoded_after_its_clean_prefix(attn, pattern):
    """Staircase equivalence: noisy block k of the 2L forward == a plain forward on [clean prefix | noisy block k]
    with the decode-time pattern (block-causal prefix for bd3, causal for idlm)."""
    model = tiny_llama(num_layers=2, attn_implementation=attn)
    length, b = 9, 3
    x0 = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(1))
    xt = x0.clone()
    xt[0, 4:] = 127
    mask = training_mask_2l(length, b, pattern)
    mask_in = additive_attention_mask(mask, torch.float32) if attn == "eager" else mask
    with torch.no_grad():
        full = model(input_ids=torch.cat([xt, x0], 1), attention_mask=mask_in,
                     position_ids=two_half_position_ids(length)).logits[0]
        for k in range(length // b):
            seq = torch.cat([x0[:, : k * b], xt[:, k * b:(k + 1) * b]], 1)
            n = seq.shape[1]
            q, kk = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (kk // b <= q // b) if pattern == "bd3" else (kk <= q)
            allowed = allowed[None, None]
            step_mask = additive_attention_mask(allowed, torch.float32) if attn == "eager" else allowed
            step = model(input_ids=seq, attention_mask=step_mask, position_ids=torch.arange(n)[None]).logits[0]
            torch.testing.assert_close(full[k * b:(k + 1) * b], step[k * b:], atol=1e-5, rtol=1e-5)
        # the clean half is the decode-time clean pass on x0
        allowed = torch.arange(length)[None, :] // (b if pattern == "bd3" else 1) <= (
            torch.arange(length)[:, None] // (b if pattern == "bd3" else 1))
        clean_mask = allowed[None, None]
        clean_in = additive_attention_mask(clean_mask, torch.float32) if attn == "eager" else clean_mask
        clean = model(input_ids=x0, attention_mask=clean_in, position_ids=torch.arange(length)[None]).logits[0]
        torch.testing.assert_close(full[length:], clean, atol=1e-5, rtol=1e-5)


def test_a_later_clean_token_changes_only_what_the_pattern_allows():
    model = tiny_llama(num_layers=2)
    length, b = 8, 2
    x0 = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(2))
    xt = torch.full_like(x0, 127)
    mask = training_mask_2l(length, b, "idlm")
    pos = two_half_position_ids(length)
    with torch.no_grad():
        base = model(input_ids=torch.cat([xt, x0], 1), attention_mask=mask, position_ids=pos).logits[0]
        x0b = x0.clone()
        x0b[0, 5] = (x0b[0, 5] + 1) % 120 + 3  # clean token 5 (block 2)
        other = model(input_ids=torch.cat([xt, x0b], 1), attention_mask=mask, position_ids=pos).logits[0]
    changed = (base - other).abs().amax(-1) > 1e-6
    # noisy queries of blocks 0..2 (positions 0..5) and clean queries < 5 must not move; noisy block 3 and clean >= 5 do
    assert changed.nonzero().flatten().tolist() == [6, 7] + [length + i for i in range(5, length)]


def test_block_first_targets_move_to_the_clean_half():
    noisy = torch.tensor([[10, 11, 12, 13, 14, -100]])  # hidden i scored on token i+1
    inside, first = split_block_first_targets(noisy, 2)
    # b = 2: tokens 2 and 4 open blocks, i.e. the targets of hidden 1 and 3
    assert inside.tolist() == [[10, -100, 12, -100, 14, -100]]
    assert first.tolist() == [[-100, 11, -100, 13, -100, -100]]
    left = torch.tensor([[0, 1, 1, 1, 1, 1]])  # left padding: blocks follow the real tokens
    inside, first = split_block_first_targets(noisy, 2, left)
    assert first.tolist() == [[-100, -100, 12, -100, 14, -100]]


def test_response_aligned_block_ids():
    labels = torch.tensor([[-100, -100, -100, 5, 5, 5, 5, 5, -100, -100],  # prompt 3, answer 5, padding
                           [-100, -100, 5, 5, -100, -100, 5, 5, 5, -100],  # two assistant turns
                           [-100, -100, -100, -100, 5, 5, 5, 5, 5, 5]])  # left-padded row (2 pads)
    padding = torch.ones_like(labels)
    padding[0, 8:] = 0
    padding[2, :2] = 0
    ids = block_ids(labels, 2, padding)
    assert ids[0, :8].tolist() == [0, 1, 2, 3, 3, 5, 5, 7]  # prompt tokens alone, answer tiled from its start
    assert ids[1].tolist() == [0, 1, 2, 2, 4, 5, 6, 6, 8, 9]  # each labelled run restarts the tiling
    assert ids[2, 2:].tolist() == [0, 1, 2, 2, 4, 4, 6, 6]  # positions count real tokens only
    assert block_ids(labels, 3, padding, "absolute")[0, :8].tolist() == [0, 0, 0, 3, 3, 3, 6, 6]
    with pytest.raises(ValueError, match="align"):
        block_ids(labels, 2, align="prompt")


@pytest.mark.parametrize("pattern", ["bd3", "idlm"])
def test_mask_with_block_ids_matches_reference(pattern):
    labels = torch.tensor([[-100, -100, -100, 5, 5, 5, 5, 5, -100], [-100, 5, 5, 5, 5, 5, 5, 5, 5]])
    padding = torch.tensor([[1] * 8 + [0], [1] * 9])
    ids = block_ids(labels, 3, padding)
    for clean_first in (False, True):
        got = training_mask_2l(9, 3, pattern, padding, clean_first, block_ids=ids)
        for row in range(2):
            ref = reference_mask_2l(9, 3, pattern, padding[row].tolist(), clean_first, ids[row].tolist())
            assert torch.equal(got[row, 0], ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_response_aligned_training_equals_block_diffusion_decoding_masks(attn):
    """The training layout is the decoder's: noisy block k of the 2L forward (prompt of 5, blocks of 3 from the end of
    the prompt) == one forward on [prompt | committed blocks | noisy block k] under block_attention_mask(pattern=
    "block", block_start=5), the mask block_diffusion_generate uses."""
    from hf_fastslow.modeling.block_diffusion import block_attention_mask, model_attention_mask

    model = tiny_llama(num_layers=2, attn_implementation=attn)
    prompt, b, length = 5, 3, 11
    x0 = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(4))
    labels = x0.clone()
    labels[:, :prompt] = -100
    xt = x0.masked_fill(labels != -100, 127)
    ids = block_ids(labels, b)
    mask = training_mask_2l(length, b, "bd3", block_ids=ids)
    with torch.no_grad():
        full = model(input_ids=torch.cat([xt, x0], 1), attention_mask=model_attention_mask(model, mask, torch.float32),
                     position_ids=two_half_position_ids(length)).logits[0]
        for start in range(prompt, length, b):
            end = min(start + b, length)
            seq = torch.cat([x0[:, :start], xt[:, start:end]], 1)
            step_mask = block_attention_mask(end, end, b, q_offset=0, pattern="block", block_start=prompt)
            step = model(input_ids=seq, attention_mask=model_attention_mask(model, step_mask, torch.float32),
                         position_ids=torch.arange(end)[None]).logits[0]
            torch.testing.assert_close(full[start:end], step[start:], atol=1e-5, rtol=1e-5)
