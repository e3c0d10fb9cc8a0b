"""Synthetic tracking sequences, the two small trackers and the OTB-style metrics (issue 15 item 2)."""

import math

import pytest
import torch
from transformers import ResNetConfig, ViTConfig

from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, slice_model
from hf_fastslow.modeling.trackers import (
    OneStreamViTTracker,
    SiameseCNNTracker,
    TrackingPairs,
    box_iou,
    crop_regions,
    decode,
    evaluate_tracker,
    head_loss,
    make_sequence,
    precision_at,
    success_auc,
    track_sequence,
)


def vit_tracker():
    torch.manual_seed(0)
    return OneStreamViTTracker(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=48), template_size=16).eval()


def cnn_tracker():
    torch.manual_seed(0)
    return SiameseCNNTracker(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
                             template_size=32, search_size=64).eval()


def test_sequences_are_deterministic_and_occlusion_only_covers_the_target():
    f1, b1 = make_sequence(3, length=12, frame_size=64)
    f2, b2 = make_sequence(3, length=12, frame_size=64)
    assert f1.shape == (12, 3, 64, 64) and b1.shape == (12, 4)
    assert torch.equal(f1, f2) and torch.equal(b1, b2)
    clear, b3 = make_sequence(3, length=12, frame_size=64, occlusion=False)
    assert torch.equal(b1, b3)  # the same walk
    changed = [t for t in range(12) if not torch.equal(f1[t], clear[t])]
    assert 2 <= len(changed) <= 4
    for t in changed:  # the occluder sits inside the target's box
        x, y, w, h = (int(v) for v in b1[t])
        diff = (f1[t] - clear[t]).abs().sum(0)
        outside = diff.clone()
        outside[max(0, y):y + h, max(0, x):x + w] = 0
        assert diff.sum() > 0 and outside.sum() == 0
    assert not torch.equal(make_sequence(4, length=12, frame_size=64)[0], f1)


def test_crop_regions_by_hand():
    frame = torch.zeros(1, 3, 8, 8)
    frame[0, :, 2:4, 4:6] = 1.0  # a 2x2 white square, centre (5, 3)
    crop = crop_regions(frame, torch.tensor([[5.0, 3.0]]), torch.tensor([2.0]), 2)
    assert torch.allclose(crop, torch.ones(1, 3, 2, 2))
    whole = crop_regions(frame, torch.tensor([[4.0, 4.0]]), torch.tensor([8.0]), 8)
    assert torch.allclose(whole, frame, atol=1e-6)


def test_head_decode_round_trip():
    labels = torch.tensor([[0.30, 0.70, 0.25, 0.2], [0.55, 0.12, 0.3, 0.4]])
    g = 8
    pred = torch.full((2, 5, g, g), -10.0)
    for b, (cx, cy, w, h) in enumerate(labels.tolist()):
        ix, iy = int(cx * g), int(cy * g)
        pred[b, 0, iy, ix] = 10.0
        pred[b, 1, iy, ix] = torch.logit(torch.tensor(cx * g - ix))
        pred[b, 2, iy, ix] = torch.logit(torch.tensor(cy * g - iy))
        pred[b, 3, iy, ix], pred[b, 4, iy, ix] = math.log(w), math.log(h)
    torch.testing.assert_close(decode(pred), labels, atol=1e-5, rtol=0)
    assert head_loss(pred, labels) < 1e-3
    assert head_loss(torch.zeros_like(pred), labels) > 1.0


def test_metrics_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]])
    ious = box_iou(pred, gt)
    torch.testing.assert_close(ious, torch.tensor([1.0, 0.0, 50 / 150]))
    # thresholds 0..1 step 0.05: frame 1 passes all but t=1 (IoU > t), frame 3 passes t < 1/3 (0..0.30: 7 of 21)
    assert success_auc(ious) == pytest.approx((20 + 0 + 7) / 21 / 3)
    assert precision_at(pred, gt, 5.0) == pytest.approx(2 / 3)
    assert precision_at(pred, gt, 30.0) == 1.0


@pytest.mark.parametrize("make", [vit_tracker, cnn_tracker])
def test_trackers_train_track_and_slice(make):
    model = make()
    ds = TrackingPairs(num_sequences=2, length=6, size=8, template_size=model.template_size,
                       search_size=model.search_size, frame_size=64)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model.train()
    out = model(**batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    model.eval()
    seq = make_sequence(7, length=5, frame_size=64)
    boxes = track_sequence(model, *seq[:1], seq[1][0])
    assert boxes.shape == (5, 4) and torch.equal(boxes[0], seq[1][0])
    metrics = evaluate_tracker(model, [seq])
    assert 0.0 <= metrics["success_auc"] <= 1.0
    masks = attach_slim_masks(model, SlimConfig(attn_granularity="dim"))
    with torch.no_grad():
        for g in masks.groups:
            if g.param is not None:
                g.param.uniform_(0.1, 1.0)
    masks.binarize(budget=0.25)
    with torch.no_grad():
        masked = model(batch["template"], batch["search"])["logits"]
    before = sum(p.numel() for p in model.parameters())
    sliced = slice_model(model, masks)
    assert sliced is model and sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(model(batch["template"], batch["search"])["logits"], masked, atol=1e-4, rtol=0)
