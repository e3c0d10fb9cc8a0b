"""Network slimming for transformers ResNets: residual-coupled channel groups, slicing, reload (issue 15 item 2)."""

import pytest
import torch
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification, ResNetModel

from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, slice_model
from hf_fastslow.modeling.slimming_resnet import channel_groups


def tiny_resnet(layer_type="basic", seed=0):
    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1],
                                                      layer_type=layer_type, num_labels=3))
    with torch.no_grad():  # trained-looking BatchNorms: signed gammas, non-zero betas and running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_residual_coupled_groups():
    model = tiny_resnet()
    groups = channel_groups(model)
    # stem + both identity-shortcut blocks of stage 0 share one channel space; each block's inner conv is its own;
    # stage 1's block output is coupled with its projection shortcut.
    sizes = sorted((len(g["producers"]), g["producers"][0][1].num_features) for g in groups)
    assert sizes == [(1, 16), (1, 16), (1, 32), (2, 32), (3, 16)]
    stem_group = next(g for g in groups if len(g["producers"]) == 3)
    assert stem_group["producers"][0][0] is model.resnet.embedder.embedder.convolution


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_masks_at_one_slicing_and_reload(tmp_path, layer_type):
    model = tiny_resnet(layer_type)
    ref = model(X).logits
    masks = attach_slim_masks(model, SlimConfig())
    assert torch.equal(model(X).logits, ref)
    assert masks.binarize(channel_budget=0.5) == {"channel": 0.5}
    masked = model(X).logits
    assert not torch.allclose(masked, ref)
    child = slice_model(model, masks)
    assert type(child).__name__ == "SlimResNetForImageClassification"
    out = child(X).logits
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    child.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(X).logits, out)


def test_coupled_channels_are_removed_together_and_scored_by_summed_gamma():
    model = tiny_resnet()
    masks = attach_slim_masks(model, SlimConfig(threshold="layerwise"))
    stem = next(g for g in masks.groups if len(g.info["bns"]) == 3)
    with torch.no_grad():
        for bn in stem.info["bns"]:
            bn.weight.fill_(1.0)
        stem.info["bns"][2].weight[5] = 0.0  # channel 5 is weak in one member only: still scored 2.0, not pruned
        for bn in stem.info["bns"]:
            bn.weight[[3, 7]] = 0.01
    masks.binarize(channel_budget=0.875)
    assert 3 not in stem.kept and 7 not in stem.kept and 5 in stem.kept
    child = slice_model(model, masks)
    r = child.resnet
    widths = {r.embedder.embedder.convolution.out_channels, r.encoder.stages[0].layers[0].layer[1].convolution
              .out_channels, r.encoder.stages[0].layers[1].layer[1].convolution.out_channels,
              r.encoder.stages[0].layers[0].layer[0].convolution.in_channels}
    assert widths == {14}


def test_network_slimming_penalty_gradient_is_s_sign_gamma():
    model = tiny_resnet()
    masks = attach_slim_masks(model, SlimConfig(w_channel=1e-3))
    bn = model.resnet.embedder.embedder.normalization
    (grad,) = torch.autograd.grad(masks.penalty(), [bn.weight])
    assert torch.equal(grad, 1e-3 * torch.sign(bn.weight.detach()))


def test_backbone_output_channels_stay_when_read_from_outside():
    torch.manual_seed(0)
    backbone = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    holder = torch.nn.Module()
    holder.backbone = backbone
    masks = attach_slim_masks(holder, SlimConfig())
    out_bn = backbone.encoder.stages[-1].layers[-1].layer[-1].normalization
    assert all(out_bn not in g.info["bns"] for g in masks.groups)
    masks.binarize(channel_budget=0.5)
    assert slice_model(holder, masks) is holder
    assert backbone(torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1] == 16


def test_resnet_errors():
    with pytest.raises(ValueError, match="ia3"):
        attach_slim_masks(tiny_resnet(), SlimConfig(mlp_backend="ia3"))
    with pytest.raises(ValueError, match="nothing to prune"):
        attach_slim_masks(tiny_resnet(), SlimConfig(channels=False))
