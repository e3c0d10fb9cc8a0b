"""Kernel gates (MetaDOCK) and the few-shot backbones: gates open == dense conv, straight-through gradient by hand,
budget penalty, errors, Conv4 Auto-class reload, the ResNet-from-config path under torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from hf_fastslow.modeling.conv4 import (
    Conv4Config,
    Conv4ForImageClassification,
    narrow_width_for_budget,
    resnet_for_few_shot,
    use_batch_statistics,
)
from hf_fastslow.modeling.kernel_gates import attach_kernel_gates


def tiny_conv4(width=8, labels=5):
    torch.manual_seed(0)
    return Conv4ForImageClassification(Conv4Config(num_labels=labels, hidden_sizes=[width] * 4))


def test_open_gates_equal_dense_conv_bitwise():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 16, 16)
    model = tiny_conv4()
    dense = model(x).logits
    gates = attach_kernel_gates(model, budget=0.5)
    assert len(gates) == 4 and gates.active_fraction() == 1.0
    assert torch.equal(model(x).logits, dense)  # the straight-through value is exactly the hard gate
    gates.set_mode("hard")
    assert torch.equal(model(x).logits, dense)


def test_open_gates_on_resnet_grouped_and_depthwise_convs():
    resnet = resnet_for_few_shot(num_labels=5, width=8)
    x = torch.randn(4, 1, 16, 16)
    dense = resnet(x).logits
    gates = attach_kernel_gates(resnet)
    assert len(gates) == sum(isinstance(m, nn.Conv2d) for m in resnet.modules())
    assert torch.equal(resnet(x).logits, dense)
    depthwise = nn.Conv2d(6, 6, 3, groups=6, padding=1)
    grouped = nn.Conv2d(6, 4, 3, groups=2, padding=1)
    y = torch.randn(2, 6, 5, 5)
    before = depthwise(y), grouped(y)
    dw_gates = attach_kernel_gates(depthwise)
    g_gates = attach_kernel_gates(grouped)
    assert dw_gates.modules()[0].scores.shape == (6, 1)  # a channel gate on a depth-wise conv
    assert g_gates.modules()[0].scores.shape == (4, 3)
    assert torch.equal(depthwise(y), before[0]) and torch.equal(grouped(y), before[1])


def test_closed_gate_equals_zeroed_kernel_and_hand_counts():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    reference = nn.Conv2d(3, 4, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    gates = attach_kernel_gates(conv)
    closed = [(0, 1), (2, 2), (3, 0)]
    with torch.no_grad():
        for o, i in closed:
            conv.parametrizations.weight[0].scores[o, i] = -0.3
            reference.weight[o, i] = 0.0
        conv.parametrizations.weight[0].scores[1, 1] = 0.0  # exactly 0 is off (strict >)
        reference.weight[1, 1] = 0.0
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(x), reference(x))
    assert gates.active_fraction() == pytest.approx(8 / 12)
    assert gates.active_conv_parameters() == 9 * 8
    assert int(gates.export_masks()[""].sum()) == 8


def test_straight_through_gradient_by_hand():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3)
    gates = attach_kernel_gates(conv, beta=2.0)
    gate = conv.parametrizations.weight[0]
    with torch.no_grad():
        gate.scores.copy_(torch.randn(3, 2) * 0.5)
    x = torch.randn(2, 2, 5, 5)
    target = torch.randn(2, 3, 3, 3)
    loss = ((conv(x) - target) ** 2).sum()
    loss.backward()
    # by hand: L(W_eff), W_eff = W * z, dL/dz = sum over the kernel of W * dL/dW_eff, dz/dscore := beta * s(1 - s)
    weight = conv.parametrizations.weight.original.detach()
    hard = (gate.scores.detach() > 0).float()
    w_eff = (weight * hard[:, :, None, None]).requires_grad_(True)
    manual_loss = ((nn.functional.conv2d(x, w_eff, conv.bias.detach()) - target) ** 2).sum()
    (d_weff,) = torch.autograd.grad(manual_loss, w_eff)
    d_z = (weight * d_weff).sum(dim=(2, 3))
    s = torch.sigmoid(2.0 * gate.scores.detach())
    assert torch.allclose(gate.scores.grad, d_z * s * (1 - s) * 2.0, atol=1e-6, rtol=1e-5)
    # the weights see the hard mask: closed kernels get no gradient
    assert torch.allclose(conv.parametrizations.weight.original.grad, d_weff * hard[:, :, None, None])
    assert gates.active_fraction() == pytest.approx(float(hard.mean()))


def test_hard_mode_gives_scores_no_gradient():
    conv = nn.Conv2d(2, 3, 3)
    gates = attach_kernel_gates(conv)
    gates.set_mode("hard")
    conv(torch.randn(1, 2, 4, 4)).sum().backward()
    gate = conv.parametrizations.weight[0]
    assert gate.scores.grad is None and conv.parametrizations.weight.original.grad is not None


def test_budget_loss_zero_at_target_and_pushes_toward_it():
    conv = nn.Conv2d(2, 2, 3)
    gates = attach_kernel_gates(conv)
    gate = conv.parametrizations.weight[0]
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([[0.1, 0.2], [-0.1, 0.3]]))  # r = 3/4
    assert gates.budget_loss(budget=0.75, weight=10.0).item() == 0.0
    loss = gates.budget_loss(budget=0.25, weight=10.0)  # r above the target: descent must lower the scores
    assert loss.item() == pytest.approx(10.0 * 0.5**2)
    (g,) = torch.autograd.grad(loss, gate.scores)
    assert (g > 0).all()
    (g_low,) = torch.autograd.grad(gates.budget_loss(budget=1.0, weight=10.0), gate.scores)
    assert (g_low < 0).all()
    with_l1 = gates.budget_loss(budget=0.75, weight=10.0, l1=0.5)
    assert with_l1.item() == pytest.approx(0.5 * 0.7)
    # the budget term never reaches the conv weights
    weight_grad = torch.autograd.grad(gates.budget_loss(budget=0.25), conv.parametrizations.weight.original,
                                      allow_unused=True)[0]
    assert weight_grad is None


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval_raises(budget):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        attach_kernel_gates(nn.Conv2d(1, 2, 3), budget=budget)
    gates = attach_kernel_gates(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gates.budget_loss(budget=budget)


def test_non_conv_modules_and_double_gating_raise():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Linear.*nn.Conv2d only"):
        attach_kernel_gates(model, include=lambda name, m: name in ("0", "2"))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        attach_kernel_gates(nn.Linear(3, 3))
    attach_kernel_gates(model)
    with pytest.raises(ValueError, match="already parametrised"):
        attach_kernel_gates(model)
    with pytest.raises(ValueError, match="budget"):
        attach_kernel_gates(nn.Conv2d(1, 2, 3)).budget_loss()


def test_conv4_reloads_through_auto_class_and_baked_gates(tmp_path):
    from transformers import AutoModelForImageClassification

    model = tiny_conv4()
    x = torch.randn(3, 1, 16, 16)
    model.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "dense")
    assert type(reloaded) is Conv4ForImageClassification
    assert torch.equal(reloaded(x).logits, model(x).logits)
    gates = attach_kernel_gates(model)
    with torch.no_grad():
        for gate in gates.modules():
            gate.scores[::2] = -1.0
    gated_logits = model(x).logits
    gates.bake()
    assert torch.equal(model(x).logits, gated_logits)
    model.save_pretrained(tmp_path / "baked")
    baked = AutoModelForImageClassification.from_pretrained(tmp_path / "baked")
    assert torch.equal(baked(x).logits, gated_logits)


def test_batch_statistics_swap_and_torch_func_on_gated_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(3)
    resnet = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 8],
                                                       depths=[1, 1], layer_type="basic", num_labels=3))
    norms = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    use_batch_statistics(resnet)
    swapped = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(swapped) == len(norms) and not any(m.track_running_stats for m in swapped)
    assert all(a.weight is b.weight for a, b in zip(norms, swapped))
    gates = attach_kernel_gates(resnet)
    params = {n: p.detach() for n, p in resnet.named_parameters()}
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])

    def loss(p):
        return nn.functional.cross_entropy(functional_call(resnet, p, (x,)).logits, y)

    grads = grad(loss)(params)
    assert all(grads[name].abs().sum() > 0 for name in gates.score_names)


def test_narrow_width_matches_active_parameters():
    assert narrow_width_for_budget(64, 1.0) == 64
    assert narrow_width_for_budget(64, 0.25) == 32
    assert narrow_width_for_budget(64, 0.5) == 45
    with pytest.raises(ValueError, match="hidden_sizes"):
        Conv4Config(hidden_sizes=[8, 0])
