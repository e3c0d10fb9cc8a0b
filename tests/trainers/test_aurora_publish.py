"""Aurora's online trainer publishes whole optimizer steps only (even when `publish()` is called from another thread
during a step), one trainer per serving head, one training thread however often `start()` is called."""

import gc
import threading
import time

import pytest
import torch
from torch import nn

from hf_fastslow.generation.aurora import AuroraConfig, AuroraHead, HotSwapHead
from hf_fastslow.trainers.aurora_online_trainer import AuroraTrainer

torch.set_num_threads(1)


def tiny_head() -> AuroraHead:
    cfg = AuroraConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                       target_vocab_size=20, draft_vocab_size=20, target_num_layers=2)
    return AuroraHead(cfg)


class SlowFillOptimizer:
    """Step k writes the value k into every parameter, one tensor at a time with a pause in between (releasing the
    GIL): a copy taken mid-step holds two values."""

    def __init__(self, params):
        self.params, self.k = list(params), 0

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        self.k += 1
        for p in self.params:
            with torch.no_grad():
                p.fill_(float(self.k))
            time.sleep(0.0005)


def test_publish_from_another_thread_never_serves_a_half_stepped_head(monkeypatch):
    hot = HotSwapHead(tiny_head())
    trainer = AuroraTrainer(hot, nn.Embedding(20, 16), sync_every=10**6, grad_clip=0.0)
    trainer.optimizer = SlowFillOptimizer(trainer.head.parameters())
    monkeypatch.setattr(trainer, "loss", lambda traces: (sum(p.sum() for p in trainer.head.parameters()) * 0, 0.0))
    errors, published = [], []
    done = threading.Event()

    def training():
        try:
            for _ in range(40):
                trainer.train_step(traces=["a trace"])
        finally:
            done.set()

    def publishing():
        while not done.is_set():
            published.append(trainer.publish())

    def reading():
        while not done.is_set():
            with hot.acquire() as (head, version):
                values = {float(v) for p in head.parameters() for v in p.unique()}
            if version and len(values) != 1:
                errors.append((version, sorted(values)))

    threads = [threading.Thread(target=f) for f in (training, publishing, reading)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trainer.steps == 40 and len(published) > 5
    assert published == sorted(published)
    assert not errors, errors[:3]
    trainer.publish()
    with hot.acquire() as (head, _):
        assert {float(v) for p in head.parameters() for v in p.unique()} == {40.0}


def test_one_trainer_per_serving_head():
    hot = HotSwapHead(tiny_head())
    embed = nn.Embedding(20, 16)
    first = AuroraTrainer(hot, embed)
    with pytest.raises(RuntimeError, match="one trainer per serving head"):
        AuroraTrainer(hot, embed)
    AuroraTrainer(HotSwapHead(tiny_head()), embed)  # its own head: fine
    del first
    gc.collect()
    AuroraTrainer(hot, embed)  # the first trainer is gone: the head takes a new one


def test_concurrent_start_runs_one_training_thread():
    trainer = AuroraTrainer(HotSwapHead(tiny_head()), nn.Embedding(20, 16))
    barrier = threading.Barrier(4)

    def start():
        barrier.wait()
        trainer.start()

    callers = [threading.Thread(target=start) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    try:
        assert sum(t.name == "aurora-trainer" and t.is_alive() for t in threading.enumerate()) == 1
    finally:
        trainer.stop(publish=False)
    assert not trainer.running
