"""Aurora online speculator: head, trainer, hot swap, drafter (tiny random Llama targets, CPU, fast)."""

import threading

import pytest
import torch

from hf_fastslow.generation.aurora import (
    AuroraConfig,
    AuroraDrafter,
    AuroraHead,
    AuroraTrace,
    AuroraTrainer,
    HotSwapHead,
    ReplayBuffer,
    default_taps,
    select_draft_vocab,
)
from hf_fastslow.generation.speculative import speculative_generate
from tests.conftest import tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from intra-op threads, and on a shared, oversubscribed box the OpenMP workers spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target():
    return tiny_llama()


def _taps(model, ids, head):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[t] for t in head.config.taps], dim=-1)[0]


def _trace(model, head, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, n + 1), generator=gen)
    return AuroraTrace(taps=_taps(model, ids, head)[:n], ids=ids[0, 1:].clone()), ids


def _spec(model, ids, drafter, **kw):
    return model.generate(ids, do_sample=False, custom_generate=speculative_generate, drafter=drafter, **kw)


# ---- head ---------------------------------------------------------------------------------------------------------
def test_default_taps_follow_eagle3_and_clamp():
    assert default_taps(30) == (2, 15, 27)  # layers 1, L/2-1, L-4 -> hidden_states index layer + 1
    assert default_taps(3) == (2, 1, 1)
    assert all(1 <= t <= 3 for t in default_taps(3))


def test_head_shapes_and_vocab_mapping(target):
    counts = torch.zeros(128)
    counts[torch.arange(100, 128)] = 5.0  # the frequent ids must win
    head = AuroraHead.from_target(target, draft_vocab_size=32, token_counts=counts, seed=0)
    cfg = head.config
    assert cfg.hidden_size == 64 and cfg.draft_vocab_size == 32 and cfg.target_vocab_size == 128
    assert head.fc.weight.shape == (64, 3 * 64)
    assert head.midlayer.self_attn.q_proj.weight.shape == (4 * 16, 2 * 64)
    assert head.lm_head.weight.shape == (32, 64)
    d2t = head.d2t
    assert torch.equal(d2t, d2t.sort().values) and d2t.unique().numel() == 32
    assert 1 in d2t.tolist()  # target EOS is always draftable
    assert set(range(100, 128)) <= set(d2t.tolist())
    # t2d is the inverse map, -1 outside the draft vocabulary
    assert torch.equal(head.t2d[d2t], torch.arange(32))
    assert int((head.t2d >= 0).sum()) == 32
    # lm_head starts as the target's output rows for the draft ids (tied embeddings here or not)
    assert torch.allclose(head.lm_head.weight, target.get_output_embeddings().weight[d2t])
    # proposals are target ids from the draft vocabulary
    ids = torch.randint(3, 128, (1, 10))
    taps = _taps(target, ids, head)
    out, logp = head.propose(taps[-4:], ids[0, -4:], target.get_input_embeddings(), k=3)
    assert out.shape == (3,) and logp.shape == (3,) and set(out.tolist()) <= set(d2t.tolist())
    assert (logp <= 0).all()
    embeds = target.get_input_embeddings()(ids).detach()
    steps = head.unroll(taps[None, :9], embeds, torch.ones(1, 9, dtype=torch.bool), 2)
    assert len(steps) == 2 and steps[0].shape == (1, 9, 32) and steps[1].shape == (1, 9, 32)
    with pytest.raises(ValueError, match="next_embeds"):
        head.unroll(taps[None], embeds, torch.ones(1, 10, dtype=torch.bool), 2)


def test_select_draft_vocab_from_sequences():
    vocab = select_draft_vocab(10, 3, [[7, 7, 7, 5, 5], [9]], always=[0])
    assert vocab.tolist() == [0, 5, 7]
    assert select_draft_vocab(10, 4).tolist() == [0, 1, 2, 3]  # no data: BPE order


def test_training_unroll_matches_inference_chain(target):
    """What the trainer optimises (teacher-forced unroll) is exactly what `propose` computes."""
    head = AuroraHead.from_target(target, window=4, seed=1)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    taps = _taps(target, ids, head)
    emb = target.get_input_embeddings()
    t, w, k = 10, 4, 3
    drafted, logp = head.propose(taps[t + 1 - w : t + 1], ids[0, t + 2 - w : t + 2], emb, k, start_pos=t + 1 - w)
    seq = ids[0].clone()
    seq[t + 2 : t + 1 + k] = drafted[: k - 1]  # feed the drafted chain as the teacher tokens
    steps = head.unroll(taps[None, : t + 1], emb(seq[1:])[None].detach(), torch.ones(1, t + 1, dtype=torch.bool), k)
    for j in range(k):
        ref = torch.log_softmax(steps[j][0, t].float(), dim=-1)
        assert int(head.d2t[ref.argmax()]) == int(drafted[j])
        torch.testing.assert_close(ref.max(), logp[j], rtol=1e-4, atol=1e-5)


# ---- trainer ------------------------------------------------------------------------------------------------------
def test_training_step_lowers_loss_on_fixed_trace(target):
    torch.manual_seed(0)
    head = AuroraHead.from_target(target, seed=0)
    trainer = AuroraTrainer(HotSwapHead(head), target.get_input_embeddings(), ttt_length=3, lr=3e-3, sync_every=1000)
    trace, _ = _trace(target, head)
    trace.loss_from = 0
    with torch.no_grad():
        before, _ = trainer.loss([trace])
    losses = [trainer.train_step([trace]) for _ in range(20)]
    with torch.no_grad():
        after, sim = trainer.loss([trace])
    assert all(isinstance(v, float) for v in losses)
    assert float(after) < 0.5 * float(before)
    assert sim > 1.0  # simulated acceptance length on the trace it learned
    assert trainer.hot.version == 0  # nothing published before sync_every steps


def test_rejection_term_lowers_probability_of_rejected_token(target):
    # Draft vocabulary = ids 0..63 (+ EOS); the verified label at anchor 4 is id 100, outside it, so the only signal
    # in this trace is the rejected proposal `bad` at anchor 4, step 0.
    head = AuroraHead.from_target(target, draft_vocab_size=64, seed=0)
    trace, _ = _trace(target, head, n=12)
    emb = target.get_input_embeddings()
    bad = int(head.d2t[5])
    trace.ids[5] = 100
    trace.ids, trace.loss_from, trace.negatives = trace.ids[:6], 4, [(4, 0, bad, 0)]

    @torch.no_grad()
    def q_bad(h):
        steps = h.unroll(trace.taps[None, :5], emb(trace.ids[None, :5]), torch.ones(1, 5, dtype=torch.bool), 1)
        return float(torch.softmax(steps[0][0, 4].float(), -1)[5])

    silent = AuroraTrainer(HotSwapHead(head), emb, ttt_length=1, rejection_weight=0.0, lr=1e-3)
    assert silent.train_step([trace]) is None  # without the rejection term there is nothing to learn here
    trainer = AuroraTrainer(HotSwapHead(head), emb, ttt_length=1, rejection_weight=0.5, lr=1e-3)
    before = q_bad(trainer.head)
    loss = trainer.train_step([trace])
    # -log(1 - q) ~ q for small q: the reported loss is the weighted unlikelihood of the rejected token
    assert loss == pytest.approx(-0.5 * torch.log1p(torch.tensor(-before)).item(), rel=1e-3)
    assert q_bad(trainer.head) < before


def test_replay_buffer_drops_oldest():
    buf = ReplayBuffer(capacity=2)
    traces = [AuroraTrace(taps=torch.zeros(i + 1, 4), ids=torch.zeros(i + 2, dtype=torch.long)) for i in range(3)]
    for tr in traces:
        buf.put(tr)
    assert len(buf) == 2 and buf.dropped == 1 and buf.total == 3
    import random

    assert all(s is not traces[0] for s in buf.sample(20, random.Random(0)))


# ---- drafter + verify loop ----------------------------------------------------------------------------------------
def test_lossless_greedy_with_untrained_and_swapping_head(target):
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = target.generate(ids, max_new_tokens=20, do_sample=False)
    drafter = AuroraDrafter(target, seed=0, sync_every=1, ttt_length=2, batch_size=2)
    assert torch.equal(_spec(target, ids, drafter, max_new_tokens=20), ref)
    drafter.trainer.train(3)  # three hot swaps
    assert drafter.version == 3
    assert torch.equal(_spec(target, ids, drafter, max_new_tokens=20), ref)


def test_lossless_greedy_batch(target):
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    drafter = AuroraDrafter(target, seed=0, ttt_length=2, max_draft_tokens=3)
    out = _spec(target, ids, drafter, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out, ref)
    assert drafter.trainer.buffer.total >= 2  # both rows produced traces


def test_online_learning_increases_acceptance_on_repetitive_stream(target):
    torch.manual_seed(0)
    prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    drafter = AuroraDrafter(target, seed=0, max_draft_tokens=3, ttt_length=3, lr=3e-3, sync_every=5, batch_size=4)
    frozen = AuroraDrafter(target, head=drafter.head, online=False, max_draft_tokens=3)

    def acceptance(d):
        _spec(target, prompt, d, max_new_tokens=24)
        return d.last_stats.mean_acceptance_length

    day0 = acceptance(drafter)
    frozen0 = acceptance(frozen)
    drafter.trainer.train(40)
    acceptance(drafter)  # the stream goes on: more traces, now drafted by a better head
    drafter.trainer.train(40)
    learned = acceptance(drafter)
    assert learned > day0 + 1.0, (day0, learned)
    assert drafter.version == 16
    assert acceptance(frozen) == frozen0 and frozen.version == 0 and frozen.trainer is None


def test_hot_swap_readers_always_see_one_complete_weight_set():
    cfg = AuroraConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                       target_vocab_size=20, draft_vocab_size=20, target_num_layers=2)
    hot = HotSwapHead(AuroraHead(cfg))
    sources = []
    for v in range(1, 4):
        h = AuroraHead(cfg)
        with torch.no_grad():
            for p in h.parameters():
                p.fill_(float(v))
        sources.append(h)
    errors, seen = [], []
    stop = threading.Event()

    def reader():
        last = -1
        try:
            while not stop.is_set():
                with hot.acquire() as (head, version):
                    values = {round(float(p.mean()), 6) for p in head.parameters()}
                    # also run the weights: a forward inside the block must not see a half-copied set
                    head.fuse(torch.ones(1, 2 * 16 + 16))
                    values |= {round(float(p.mean()), 6) for p in head.parameters()}
                if version > 0 and len(values) != 1:
                    errors.append(("mixed weights", version, values))
                if version < last:
                    errors.append(("version went back", last, version))
                last = version
                seen.append(version)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    versions = [hot.publish(sources[i % 3]) for i in range(60)]
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert versions == list(range(1, 61)) and hot.version == 60
    assert max(seen) > 0


def test_drafters_built_from_one_head_do_not_share_weights(target):
    head = AuroraHead.from_target(target, seed=0)
    online = AuroraDrafter(target, head=head, sync_every=1, ttt_length=1)
    frozen = AuroraDrafter(target, head=head, online=False)
    _spec(target, torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(6)), online, max_new_tokens=8)
    online.trainer.train(2)  # two publishes: both of the online drafter's replicas are rewritten
    assert online.version == 2
    for name, value in head.state_dict().items():
        assert torch.equal(frozen.head.state_dict()[name], value), name
    assert not torch.equal(online.head.fc.weight, head.fc.weight)


def test_background_training_while_generating(target):
    """Concurrent propose (generate) and training thread: no exception, lossless, versions monotonic."""
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    ref = target.generate(ids, max_new_tokens=16, do_sample=False)
    drafter = AuroraDrafter(target, seed=0, sync_every=1, ttt_length=2, batch_size=2, flush_every=4,
                            max_draft_tokens=3)
    _spec(target, ids, drafter, max_new_tokens=16)  # day-0 traces so the thread has data at once
    drafter.start()
    try:
        for _ in range(3):
            assert torch.equal(_spec(target, ids, drafter, max_new_tokens=16), ref)
    finally:
        drafter.stop()
    trace = list(drafter.version_trace)
    assert trace == sorted(trace)
    assert drafter.trainer.steps > 0 and drafter.version >= 1


def test_checkpoint_round_trip(target, tmp_path):
    drafter = AuroraDrafter(target, draft_vocab_size=40, seed=0, ttt_length=2, max_draft_tokens=3)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    _spec(target, ids, drafter, max_new_tokens=10)
    drafter.trainer.train(3)
    drafter.trainer.publish()
    drafter.save_pretrained(tmp_path, figures={"acceptance_length": 1.5})
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    card = (tmp_path / "README.md").read_text()
    assert "2602.06932" in card and "hf_fastslow" in card
    loaded = AuroraHead.from_pretrained(tmp_path)
    saved = drafter.head
    assert loaded.config == saved.config
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.t2d, saved.t2d)
    frozen = AuroraDrafter(target, head=loaded, online=False)
    ref = target.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(_spec(target, ids, frozen, max_new_tokens=10), ref)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_bad_input_errors(target):
    with pytest.raises(ValueError, match="max_draft_tokens"):
        AuroraDrafter(target, max_draft_tokens=0)
    head = AuroraHead.from_target(target, seed=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        head.propose(torch.zeros(2, 192), torch.tensor([3, 4]), target.get_input_embeddings(), k=0)
    with pytest.raises(ValueError, match="max_draft"):
        AuroraHead.from_target(target, max_draft=0)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        AuroraHead.from_target(target, draft_vocab_size=500)
    with pytest.raises(ValueError, match="out of range"):
        AuroraHead.from_target(target, taps=(1, 9))
    with pytest.raises(ValueError, match="hidden size"):
        AuroraDrafter(tiny_llama(hidden=32), head=head)
    with pytest.raises(ValueError, match="vocabulary"):
        AuroraDrafter(tiny_llama(vocab=96), head=head)
    frozen = AuroraDrafter(target, head=head, online=False)
    with pytest.raises(ValueError, match="frozen"):
        frozen.start()
    # the verify loop also rejects a head built for another target
    other = AuroraDrafter(target, head=head, online=False)
    small = tiny_llama(vocab=96)
    with pytest.raises(ValueError, match="vocabulary"):
        small.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, custom_generate=speculative_generate,
                       drafter=other)
