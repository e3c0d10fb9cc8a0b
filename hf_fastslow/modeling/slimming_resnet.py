"""Network slimming (Liu et al., ICCV 2017) for transformers ResNets: BatchNorm gammas are the channel scores (L1
penalised during search), and channels joined by a residual sum form one group, scored by the sum of |gamma| over
its BatchNorms and kept or removed together."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ResNetForImageClassification, ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetShortCut

from .slimming import MaskGroup, SlimConfig, SlimMasks

__all__ = ["attach_resnet", "slice_resnet", "channel_groups"]


class _Spaces:
    """Union-find over channel spaces; each space lists its producers (conv, bn) and consumers (conv / linear)."""

    def __init__(self):
        self.parent: list[int] = []
        self.producers: dict[int, list] = {}
        self.consumers: dict[int, list] = {}

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for i in range(len(self.parent)):
            g = out.setdefault(self.find(i), {"producers": [], "consumers": []})
            g["producers"] += self.producers.get(i, [])
            g["consumers"] += self.consumers.get(i, [])
        return out


def _resnet_parts(model) -> tuple[ResNetModel, nn.Linear | None]:
    if isinstance(model, ResNetForImageClassification):
        head = model.classifier[-1] if isinstance(model.classifier[-1], nn.Linear) else None
        return model.resnet, head
    found = [m for m in model.modules() if isinstance(m, ResNetModel)]
    if len(found) != 1:
        raise TypeError(f"network slimming needs exactly one ResNetModel inside {type(model).__name__}, "
                        f"found {len(found)}.")
    return found[0], None


def channel_groups(model) -> list[dict]:
    """The residual-coupled channel groups of a transformers ResNet, in forward order: each a dict with `producers`
    [(conv, bn)], `consumers` [conv or linear reading these channels] and `prunable` (False for the backbone's output
    channels when something outside the ResNet reads them)."""
    resnet, head = _resnet_parts(model)
    sp = _Spaces()
    emb = resnet.embedder.embedder
    cur = sp.new()
    sp.producers[cur] = [(emb.convolution, emb.normalization)]
    for stage in resnet.encoder.stages:
        for block in stage.layers:
            inp, prev = cur, cur
            for conv_layer in block.layer:
                sp.consumers.setdefault(prev, []).append(conv_layer.convolution)
                prev = sp.new()
                sp.producers[prev] = [(conv_layer.convolution, conv_layer.normalization)]
            if isinstance(block.shortcut, ResNetShortCut):
                sp.consumers.setdefault(inp, []).append(block.shortcut.convolution)
                sp.producers[prev].append((block.shortcut.convolution, block.shortcut.normalization))
            else:  # identity shortcut: the block's output channels are its input channels
                sp.union(prev, inp)
            cur = prev
    final = sp.find(cur)
    if head is not None:
        sp.consumers.setdefault(cur, []).append(head)
    groups = []
    for root, g in sp.groups().items():
        if not g["producers"]:
            continue
        g["prunable"] = root != final or head is not None
        groups.append(g)
    return groups


def _bn_mask_hook(binary: torch.Tensor):
    def hook(module, inputs, output):
        return output * binary.to(output.dtype)[None, :, None, None]

    return hook


def attach_resnet(model, cfg: SlimConfig, masks: SlimMasks) -> None:
    if not cfg.channels:
        raise ValueError("SlimConfig(channels=False) leaves nothing to prune in a ResNet.")
    if cfg.mlp_backend == "ia3":
        raise ValueError("mlp_backend='ia3' has no ResNet counterpart (network slimming scores BatchNorm gammas).")
    index = 0
    for g in channel_groups(model):
        if not g["prunable"]:
            continue
        bns = [bn for _, bn in g["producers"]]
        units = bns[0].num_features
        binary = torch.ones(units, device=bns[0].weight.device)
        for bn in bns:
            masks.handles.append(bn.register_forward_hook(_bn_mask_hook(binary)))

        def score(bns=bns):
            return sum(bn.weight.detach().abs().float() for bn in bns)

        masks.groups.append(MaskGroup("channel", f"group{index}", index, units, None, score_fn=score,
                                      info={"bns": bns, "producers": g["producers"], "consumers": g["consumers"],
                                            "binary": binary}))
        index += 1


def _select(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(dim, idx.to(t.device)).clone()


@torch.no_grad()
def slice_resnet(model, masks: SlimMasks) -> dict:
    resnet, head = _resnet_parts(model)
    names = {id(m): n for n, m in resnet.named_modules()}
    for g in masks.groups:
        idx = g.kept
        for conv, bn in g.info["producers"]:
            conv.weight = nn.Parameter(_select(conv.weight, 0, idx))
            conv.out_channels = len(idx)
            bn.weight = nn.Parameter(_select(bn.weight, 0, idx))
            bn.bias = nn.Parameter(_select(bn.bias, 0, idx))
            bn.running_mean = _select(bn.running_mean, 0, idx)
            bn.running_var = _select(bn.running_var, 0, idx)
            bn.num_features = len(idx)
        for consumer in g.info["consumers"]:
            consumer.weight = nn.Parameter(_select(consumer.weight, 1, idx))
            if isinstance(consumer, nn.Linear):
                consumer.in_features = len(idx)
            else:
                consumer.in_channels = len(idx)
    shapes = dict(getattr(getattr(model, "config", None), "slim_conv_shapes", None) or {})
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            shapes[names[id(m)]] = [m.out_channels, m.in_channels]
    return {"slim_conv_shapes": shapes}
