"""The functional pieces of implicit MAML: inner-loop adaptation on a dict of fast weights, conjugate gradient,
Hessian-vector products with `torch.func`, the implicit meta-gradient, and per-episode evaluation.

Everything works on `{parameter name: tensor}` dicts run through `torch.func.functional_call`, so the model's own
parameters are never touched here; `IMAMLTrainer` writes the meta-gradient into `.grad` and lets its optimizer step.
Kernel gates (`hf_fastslow.modeling.kernel_gates`) are ordinary parameters in these dicts: they are adapted in the
inner loop with the weights and their initialisation receives a meta-gradient like any other parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

Params = dict[str, torch.Tensor]


@dataclass
class InnerLoop:
    """What one episode's adaptation does (see `IMAMLConfig` for the meaning of each field)."""

    steps: int = 16
    lr: float = 5e-3
    gate_lr: float | None = None
    lam: float = 0.5
    proximal: bool = False
    pull_back: bool = True
    budget: float | None = None
    budget_weight: float = 0.0
    gate_l1: float = 0.0


def logits_of(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, params, (x,))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def task_loss(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits_of(model, params, x), y)


def gate_terms(gates, params: Params, loop: InnerLoop) -> torch.Tensor | float:
    """The budget penalty and the scores' L1 on `params`' gate scores (0 without gates or budget)."""
    if gates is None or loop.budget is None or (loop.budget_weight == 0 and loop.gate_l1 == 0):
        return 0.0
    return gates.budget_loss(params, budget=loop.budget, weight=loop.budget_weight, l1=loop.gate_l1)


def check_batch_statistics(model: nn.Module) -> None:
    """Meta-learning needs batch statistics in BatchNorm: running-stat buffers are updated in place, which
    `torch.func.grad` rejects, and would mix the statistics of different tasks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(
                f"{name} ({type(module).__name__}) keeps running statistics; meta-learning needs batch statistics "
                "(track_running_stats=False). Call hf_fastslow.modeling.conv4.use_batch_statistics(model) first."
            )


def adapt(model: nn.Module, meta_params: Params, x: torch.Tensor, y: torch.Tensor, loop: InnerLoop,
          gates=None) -> Params:
    """Inner loop: `loop.steps` SGD steps from `meta_params` on the support set; returns detached fast weights.

    One forward per step serves both of the MetaDOCK code's "bilevel" passes: the straight-through forward has the
    hard-masked value, so the weights' gradient equals the hard pass's, and the budget terms reach the scores only.
    """
    score_names = set(gates.score_names) if gates is not None else set()
    gate_lr = loop.lr if loop.gate_lr is None else loop.gate_lr
    rates = {name: gate_lr if name in score_names else loop.lr for name in meta_params}
    fast = {name: p.detach().clone() for name, p in meta_params.items()}
    for _ in range(loop.steps):
        for p in fast.values():
            p.requires_grad_(True)
        loss = task_loss(model, fast, x, y) + gate_terms(gates, fast, loop)
        if loop.proximal and loop.lam:
            loss = loss + 0.5 * loop.lam * sum(((fast[n] - meta_params[n].detach()) ** 2).sum() for n in fast)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {name: (p - rates[name] * g).detach() for (name, p), g in zip(fast.items(), grads)}
    if loop.pull_back and loop.lam:
        fast = {name: p - rates[name] * loop.lam * (p - meta_params[name].detach()) for name, p in fast.items()}
    return fast


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat[start: start + ref.numel()].view_as(ref)
        start += ref.numel()
    return out


def cg_solve(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
             tol: float = 0.0) -> torch.Tensor:
    """Conjugate gradient for `A x = b` with `A` symmetric positive definite given as `matvec`, from x = 0."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(iters):
        if rs.sqrt() <= tol:
            break
        ap = matvec(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def hessian_vector_product(loss_fn: Callable[[Params], torch.Tensor], params: Params, vector: Params) -> Params:
    """`H v` of `loss_fn` at `params`, forward-over-reverse: `jvp(grad(loss_fn))`."""
    primals = {name: p.detach() for name, p in params.items()}
    return jvp(grad(loss_fn), (primals,), (vector,))[1]


def implicit_meta_gradient(model: nn.Module, fast: Params, support: tuple, query: tuple, loop: InnerLoop,
                           cg_steps: int, cg_damping: float, lam_damping: float, gates=None):
    """The iMAML meta-gradient at adapted weights `fast`: `v = ((1 + c) I + H / (λ + λ_d))^{-1} g`.

    `g` is the gradient of the query cross-entropy plus the budget terms; `H` the Hessian of the support
    cross-entropy alone. Returns `(v as a dict, query loss, query accuracy)`.
    """
    qx, qy = query
    sx, sy = support
    leaves = {name: p.detach().requires_grad_(True) for name, p in fast.items()}
    logits = logits_of(model, leaves, qx)
    query_loss = nn.functional.cross_entropy(logits, qy)
    g = flatten(torch.autograd.grad(query_loss + gate_terms(gates, leaves, loop), list(leaves.values())))
    accuracy = (logits.argmax(-1) == qy).float().mean().item()

    def support_loss(p: Params) -> torch.Tensor:
        return task_loss(model, p, sx, sy)

    scale = 1.0 / (loop.lam + lam_damping)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        hv = hessian_vector_product(support_loss, fast, unflatten(v, fast))
        return (1.0 + cg_damping) * v + scale * flatten(hv.values())

    v = cg_solve(matvec, g.detach(), cg_steps)
    return unflatten(v, fast), query_loss.item(), accuracy


@torch.no_grad()
def query_accuracy(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = logits_of(model, params, x)
    return (logits.argmax(-1) == y).float().mean().item(), nn.functional.cross_entropy(logits, y).item()


def evaluate_episodes(model: nn.Module, episodes, loop: InnerLoop, gates=None) -> dict:
    """Adapt to each episode's support set and score its query set: per task the accuracy, the active kernel
    fraction and the fraction of gates the inner loop flipped away from the meta-learned initialisation."""
    meta = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    accuracies, losses, fractions, flipped = [], [], [], []
    for episode in episodes:
        fast = adapt(model, meta, episode["support_x"], episode["support_y"], loop, gates)
        accuracy, loss = query_accuracy(model, fast, episode["query_x"], episode["query_y"])
        accuracies.append(accuracy)
        losses.append(loss)
        if gates is not None:
            fractions.append(gates.active_fraction(fast))
            changed = sum(int(((fast[n] > 0) != (meta[n] > 0)).sum()) for n in gates.score_names)
            flipped.append(changed / gates.num_kernels())
    return {"accuracies": accuracies, "losses": losses, "active_fractions": fractions, "gates_flipped": flipped}
