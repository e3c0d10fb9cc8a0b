"""diffusers' LLaDA2Pipeline as a peer (integrations/dlm_seam.run_llada2_pipeline) on tiny random models.

- On a LLaDA-style model (bidirectional, no shift) the pipeline equals a loop written here from its documented
  semantics (whole window recomputed bidirectionally each step, 0-aligned blocks, the per-step commit quota).
- On block-causal / causal models with shift, whose prompt fills whole blocks, it returns token for token what
  `block_diffusion_generate` returns (float64), with fewer but longer forwards (no cache).
"""

from __future__ import annotations

import pytest
import torch

from hf_fastslow.integrations.dlm_seam import llada2_pipeline_available, run_llada2_pipeline
from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not llada2_pipeline_available(), reason="diffusers with LLaDA2Pipeline not installed")

MASK = 127


def dlm(attention, logit_shift, block_size=4, dtype=torch.float64, seed=0):
    model = tiny_llama(num_layers=2, seed=seed).to(dtype)
    if attention == "bidirectional":
        model.config.is_causal = False  # a LLaDA: plain forwards attend both ways
    return attach_block_diffusion(model, BlockDiffusionConfig(MASK, block_size, logit_shift, attention))


def commit_quota(block, steps):
    base, extra = divmod(block, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.no_grad()
def llada_reference(model, ids, *, block, steps, threshold, max_new):
    """The pipeline's loop for a LLaDA (greedy, no editing, no EOS): 0-aligned blocks; each step runs the model over
    everything up to the current block's end (bidirectional: the model's own plain forward) and commits the masked
    slots above `threshold`, or the step's quota of the most confident ones when fewer pass. A block whose masks are
    all committed before its last step costs one more forward (the pipeline checks at the top of its loop)."""
    prompt = ids.shape[1]
    total = -(-(prompt + max_new) // block) * block
    x = torch.full((ids.shape[0], total), MASK, dtype=torch.long)
    x[:, :prompt] = ids
    real = torch.zeros_like(x)
    real[:, : prompt + max_new] = 1
    forwards = 0
    for b in range(prompt // block, total // block):
        end = (b + 1) * block
        for k in commit_quota(block, steps):
            window = x[:, :end]
            if not (window[:, -block:] == MASK).any():
                forwards += 1  # the pipeline runs one more forward before it notices the block is complete
                break
            logits = model(window, attention_mask=real[:, :end]).logits[:, -block:].float()
            forwards += 1
            logits[..., MASK] = torch.finfo(logits.dtype).min
            probs = logits.softmax(-1)
            conf, tok = probs.max(-1)
            masked = window[:, -block:] == MASK
            conf = conf.masked_fill(~masked, -torch.inf)
            for r in range(x.shape[0]):
                take = masked[r] & (conf[r] > threshold)
                if take.sum() < k:
                    take = torch.zeros_like(take)
                    take[conf[r].topk(min(k, int(masked[r].sum()))).indices] = True
                x[r, end - block : end][take] = tok[r][take]
    return torch.cat([ids, x[:, prompt : prompt + max_new]], dim=1), forwards


@pytest.mark.parametrize("prompt_len", [8, 6])  # 6: the first generated block holds the prompt's last 2 tokens
@pytest.mark.parametrize(("steps", "threshold"), [(4, 1.0), (2, 0.02)])
def test_llada_style_model_matches_the_pipeline_loop(prompt_len, steps, threshold):
    model = dlm("bidirectional", logit_shift=False)
    ids = torch.arange(3, 3 + prompt_len)[None]
    out = run_llada2_pipeline(model, None, ids, steps=steps, threshold=threshold, max_new_tokens=8)
    ref, forwards = llada_reference(model, ids, block=4, steps=steps, threshold=threshold, max_new=8)
    assert torch.equal(out.sequences, ref)
    assert not (out.sequences == MASK).any()
    assert out.num_forwards == forwards
    if threshold >= 1.0 and prompt_len % 4 == 0:  # one slot per step: `steps` forwards per generated block
        assert out.num_forwards == steps * (8 // 4)


@pytest.mark.parametrize(("attention", "logit_shift"), [("block", False), ("block", True), ("causal", True)])
@pytest.mark.parametrize(("steps", "threshold"), [(4, 1.0), (2, 0.05), (4, 0.3)])
def test_equals_block_diffusion_generate_on_whole_prompt_blocks(attention, logit_shift, steps, threshold):
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate

    model = dlm(attention, logit_shift)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    ours = model.generate(ids, custom_generate=block_diffusion_generate, steps=steps, threshold=threshold,
                          max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    peer = run_llada2_pipeline(model, None, ids, steps=steps, threshold=threshold, max_new_tokens=12)
    assert torch.equal(peer.sequences, ours.sequences)
    # The peer spends no prefill and no commit pass (each of its forwards covers the whole window); with these
    # settings no block finishes before its last step, so it never pays its extra "notice" forward.
    assert peer.num_forwards <= int(ours.num_forwards[0])
    if threshold >= 1.0:
        assert peer.num_forwards == steps * 3


def test_left_padded_batch():
    """Rows decode independently of their batch-mates when they carry no padding (positions are arange)."""
    model = dlm("bidirectional", logit_shift=False)
    ids = torch.tensor([[0, 0, 9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    out = run_llada2_pipeline(model, None, ids, attention_mask=mask, steps=4, threshold=0.9, max_new_tokens=8)
    solo = run_llada2_pipeline(model, None, ids[1:], steps=4, threshold=0.9, max_new_tokens=8)
    assert torch.equal(out.sequences[1:], solo.sequences)
    assert not (out.sequences[:, 8:] == MASK).any()


def test_eos_stops_rows():
    model = dlm("bidirectional", logit_shift=False)
    ids = torch.arange(3, 11)[None]
    free = run_llada2_pipeline(model, None, ids, steps=4, threshold=1.0, max_new_tokens=12)
    eos = int(free.sequences[0, 9])  # a token the model commits in the first generated block
    stopped = run_llada2_pipeline(model, None, ids, steps=4, threshold=1.0, max_new_tokens=12, eos_token_id=eos)
    assert stopped.num_forwards == 4 < free.num_forwards
    assert torch.equal(stopped.sequences[0, :12], free.sequences[0, :12])


def test_shift_and_mask_suppression_reach_the_model_output():
    """With the mask token left in, a random model may commit [MASK]; suppression (the default) never does."""
    model = dlm("block", logit_shift=True)
    with torch.no_grad():
        model.lm_head.weight[MASK] = model.model.norm.weight * 50  # make [MASK] the top token everywhere
    ids = torch.arange(3, 11)[None]
    kept = run_llada2_pipeline(model, None, ids, steps=4, threshold=1.0, max_new_tokens=4, suppress_mask_token=False)
    assert (kept.sequences[0, 8:] == MASK).any()
    out = run_llada2_pipeline(model, None, ids, steps=4, threshold=1.0, max_new_tokens=4)
    assert not (out.sequences == MASK).any()


def test_errors(monkeypatch):
    plain = tiny_llama(num_layers=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="block_size and mask_token_id"):
        run_llada2_pipeline(plain, None, ids, steps=2, threshold=0.9, max_new_tokens=4)
    with pytest.raises(ValueError, match="attention must be one of"):
        run_llada2_pipeline(plain, None, ids, block_size=4, mask_token_id=MASK, steps=2, threshold=0.9,
                            max_new_tokens=4, attention="full")
    import hf_fastslow.integrations.diffusers as seam

    monkeypatch.setattr(seam, "diffusers_available", lambda: False)
    with pytest.raises(ImportError, match="pip install"):
        run_llada2_pipeline(plain, None, ids, block_size=4, mask_token_id=MASK, steps=2, threshold=0.9,
                            max_new_tokens=4)


@pytest.mark.slow
def test_smollm2_peer_equals_ours_on_whole_prompt_blocks(default_model):
    """SmolLM2-135M (unconverted, I-DLM-style causal + shift, mask = the reused <empty_output>) in float64: the
    pipeline and block_diffusion_generate return the same tokens."""
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate
    from hf_fastslow.modeling.block_diffusion import ensure_mask_token

    model, tok = default_model
    model = model.to(torch.float64)
    try:
        mask_id = ensure_mask_token(model, tok)
        attach_block_diffusion(model, BlockDiffusionConfig(mask_id, 4, True, "causal"))
        ids = tok("The capital of France is Paris. The capital of Italy", return_tensors="pt").input_ids[:, :8]
        ours = model.generate(ids, custom_generate=block_diffusion_generate, steps=4, threshold=0.9,
                              max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        peer = run_llada2_pipeline(model, tok, ids, steps=4, threshold=0.9, max_new_tokens=8)
        assert torch.equal(peer.sequences, ours.sequences)
        # Forwards differ both ways: ours adds a prefill, the peer one "notice" forward per block finished early.
        assert peer.num_forwards >= 2 * 2  # at least one step per block, plus the notice forward when early
    finally:
        model.to(torch.float32)
        del model.config.block_diffusion
