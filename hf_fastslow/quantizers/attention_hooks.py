"""Forward pre-hooks on a model's attention modules, registered once per model (shared by the XQuant and QVG caches,
which read each attention call's inputs or positions through them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def attach_pre_hooks(model: nn.Module, attr: str, hook: Callable, modules: Iterable[nn.Module]) -> list:
    """Register `hook` (with kwargs) on every module once; the handles are kept on `model` under `attr`."""
    handles = getattr(model, attr, None)
    if handles:
        return handles
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    setattr(model, attr, handles)
    return handles


def detach_pre_hooks(model: nn.Module, attr: str) -> None:
    """Remove the hooks `attach_pre_hooks` kept under `attr` (a no-op when there are none)."""
    for handle in getattr(model, attr, None) or []:
        handle.remove()
    if hasattr(model, attr):
        delattr(model, attr)
