"""Implicit MAML with kernel gates: CG vs a direct solve, Hessian-vector products vs an explicit Hessian, the implicit
meta-gradient vs autograd through a converged inner loop, gates adapted per task, the Trainer end to end, errors."""

import pytest
import torch
from torch import nn

from hf_fastslow.evaluation.few_shot import (
    DROPPED_CLASSES,
    SPLIT_DIGITS,
    EpisodeDataset,
    collate_episodes,
    digit_rotation_classes,
)
from hf_fastslow.modeling.conv4 import Conv4Config, Conv4ForImageClassification
from hf_fastslow.modeling.kernel_gates import attach_kernel_gates
from hf_fastslow.trainers.imaml_config import IMAMLConfig
from hf_fastslow.trainers.imaml_core import (
    InnerLoop,
    adapt,
    cg_solve,
    flatten,
    hessian_vector_product,
    implicit_meta_gradient,
    task_loss,
)


@pytest.fixture(scope="module")
def train_classes():
    return digit_rotation_classes("train", image_size=16)


def test_cg_matches_linalg_solve():
    torch.manual_seed(0)
    m = torch.randn(50, 50, dtype=torch.float64)
    # SPD and conditioned like the implicit system (1 + c) I + H / lambda (condition number ~5)
    a = m @ m.T / 50 + torch.eye(50, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64)
    x = cg_solve(lambda v: a @ v, b, iters=50)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-6, rtol=0)
    few = cg_solve(lambda v: a @ v, b, iters=3)
    assert not torch.allclose(few, torch.linalg.solve(a, b), atol=1e-3)  # the test can tell a short solve apart


def test_hessian_vector_product_matches_explicit_hessian():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    params = {n: p.detach() for n, p in net.named_parameters()}
    vector = {n: torch.randn_like(p) for n, p in params.items()}

    def loss(p):
        return task_loss(net, p, x, y)

    hv = flatten(hessian_vector_product(loss, params, vector).values())
    shapes = {n: p.shape for n, p in params.items()}

    def flat_loss(flat):
        out, start = {}, 0
        for n, shape in shapes.items():
            size = torch.Size(shape).numel()
            out[n] = flat[start: start + size].view(shape)
            start += size
        return loss(out)

    hessian = torch.autograd.functional.hessian(flat_loss, flatten(params.values()))
    assert torch.allclose(hv, hessian @ flatten(vector.values()), atol=1e-10)


def test_implicit_meta_gradient_matches_autograd_through_converged_inner_loop():
    """Textbook iMAML (proximal inner loop, c = 0, lambda_d = 0) on a strongly convex inner problem: the CG implicit
    gradient equals differentiating the query loss through the unrolled, converged inner loop."""
    torch.manual_seed(2)
    net = nn.Linear(4, 3).double()
    sx, sy = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    qx, qy = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    lam = 1.0
    loop = InnerLoop(steps=300, lr=0.3, lam=lam, proximal=True, pull_back=False)
    meta = {n: p.detach() for n, p in net.named_parameters()}
    fast = adapt(net, meta, sx, sy, loop)
    v, _, _ = implicit_meta_gradient(net, fast, (sx, sy), (qx, qy), loop, cg_steps=40, cg_damping=0.0,
                                     lam_damping=0.0)
    theta = {n: p.clone().requires_grad_(True) for n, p in meta.items()}
    phi = dict(theta)
    for _ in range(loop.steps):
        inner = task_loss(net, phi, sx, sy) + 0.5 * lam * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(inner, list(phi.values()), create_graph=True)
        phi = {n: p - loop.lr * g for (n, p), g in zip(phi.items(), grads)}
    unrolled = torch.autograd.grad(task_loss(net, phi, qx, qy), list(theta.values()))
    assert torch.allclose(flatten(v.values()), flatten(unrolled), atol=1e-7)
    # and it is not simply the query gradient at the adapted weights (the correction matters here)
    leaves = {n: p.clone().requires_grad_(True) for n, p in fast.items()}
    naive = flatten(torch.autograd.grad(task_loss(net, leaves, qx, qy), list(leaves.values())))
    assert not torch.allclose(naive, flatten(unrolled), atol=1e-3)


def test_inner_loop_adapts_gates_per_task(train_classes):
    torch.manual_seed(3)
    model = Conv4ForImageClassification(Conv4Config(num_labels=5, hidden_sizes=[8] * 4))
    gates = attach_kernel_gates(model, budget=0.5, init_range=1e-3)
    meta = {n: p.detach() for n, p in model.named_parameters()}
    loop = InnerLoop(steps=4, lr=0.05, gate_lr=5.0, budget=0.5, budget_weight=0.0)
    episodes = EpisodeDataset(train_classes, ways=5, shots=2, queries=2, seed=0)
    masks = []
    for i in range(2):
        fast = adapt(model, meta, episodes[i]["support_x"], episodes[i]["support_y"], loop, gates)
        masks.append(torch.cat([(fast[n] > 0).flatten() for n in gates.score_names]))
        assert all(torch.equal(meta[n], p) for n, p in model.named_parameters())  # meta-parameters untouched
    assert not masks[0].all() and not masks[1].all()  # some kernels closed in the inner loop
    assert not torch.equal(masks[0], masks[1])  # ... and not the same ones for two tasks
    # the scores have their own inner learning rate: 0 freezes them while the weights move, and the other way round
    sx, sy = episodes[0]["support_x"], episodes[0]["support_y"]
    frozen_gates = adapt(model, meta, sx, sy, InnerLoop(steps=1, lr=0.05, gate_lr=0.0), gates)
    frozen_weights = adapt(model, meta, sx, sy, InnerLoop(steps=1, lr=0.0, gate_lr=5.0), gates)
    scores = set(gates.score_names)
    assert all(torch.equal(frozen_gates[n], meta[n]) for n in scores)
    assert any(not torch.equal(frozen_gates[n], meta[n]) for n in meta if n not in scores)
    assert all(torch.equal(frozen_weights[n], meta[n]) for n in meta if n not in scores)
    assert any(not torch.equal(frozen_weights[n], meta[n]) for n in scores)


def test_episodes_splits_and_errors(train_classes):
    digits = {split: {d for d, _ in digit_rotation_classes(split, image_size=8)} for split in ("val", "test")}
    assert {d for d, _ in train_classes} == set(SPLIT_DIGITS["train"])
    assert digits["val"] == set(SPLIT_DIGITS["val"]) and digits["test"] == set(SPLIT_DIGITS["test"])
    assert (9, 2) in DROPPED_CLASSES and (9, 2) not in digit_rotation_classes("test", image_size=8)
    assert len(train_classes) == 18
    data = EpisodeDataset(train_classes, ways=5, shots=3, queries=4, seed=7)
    episode = data[5]
    assert episode["support_x"].shape == (15, 1, 16, 16) and episode["query_x"].shape == (20, 1, 16, 16)
    assert torch.equal(episode["support_y"], torch.arange(5).repeat_interleave(3))
    assert torch.equal(data[5]["query_x"], episode["query_x"])  # fixed tasks
    batch = collate_episodes([data[0], data[1]])
    assert batch["support_x"].shape == (2, 15, 1, 16, 16)
    few = {key: images[:3] for key, images in train_classes.items()}
    with pytest.raises(ValueError, match="need 5 examples per class"):
        EpisodeDataset(few, ways=5, shots=1, queries=4)
    with pytest.raises(ValueError, match="needs 20 classes"):
        EpisodeDataset(train_classes, ways=20, shots=1)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        EpisodeDataset(train_classes, ways=5, shots=0)
    with pytest.raises(ValueError, match="split"):
        digit_rotation_classes("meta-test")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        IMAMLConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="fp16"):
        IMAMLConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        IMAMLConfig(output_dir=str(tmp_path), budget=1.2)
    with pytest.raises(ValueError, match="inner_steps"):
        IMAMLConfig(output_dir=str(tmp_path), inner_steps=0)


def test_trainer_rejects_running_statistics(tmp_path):
    from hf_fastslow.trainers.imaml_trainer import IMAMLTrainer

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(ValueError, match="use_batch_statistics"):
        IMAMLTrainer(model=model, args=IMAMLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True))


def test_trainer_meta_learns_gate_initialisation_and_keeps_best_on_validation(tmp_path, train_classes):
    from hf_fastslow.trainers.imaml_trainer import IMAMLTrainer

    torch.set_num_threads(1)
    torch.manual_seed(4)
    model = Conv4ForImageClassification(Conv4Config(num_labels=5, hidden_sizes=[8] * 4))
    gates = attach_kernel_gates(model, budget=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    val = EpisodeDataset(digit_rotation_classes("val"), ways=5, shots=1, queries=3, length=4, seed=1)
    args = IMAMLConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                       inner_steps=2, inner_lr=0.1, cg_steps=2, eval_strategy="steps", eval_steps=1,
                       save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                       budget_warmup_steps=1)
    trainer = IMAMLTrainer(model=model, args=args, gates=gates, eval_dataset=val,
                           train_dataset=EpisodeDataset(train_classes, ways=5, shots=1, queries=3, seed=0))
    evaluated = []
    original_meta_test = trainer.meta_test

    def recording_meta_test(dataset, metric_key_prefix="test"):
        metrics = original_meta_test(dataset, metric_key_prefix)
        evaluated.append((metrics[f"{metric_key_prefix}_accuracy"],
                          {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
        return metrics

    trainer.meta_test = recording_meta_test
    trainer.train()
    assert len(evaluated) == 3
    for name in gates.score_names:  # the gate initialisation received a meta-gradient and moved
        assert not torch.equal(before[name], dict(model.named_parameters())[name])
    best_accuracy, best_state = max(evaluated, key=lambda item: item[0])  # first best wins ties, as evaluate keeps it
    best_index = [acc for acc, _ in evaluated].index(best_accuracy)
    assert trainer.best_metric == best_accuracy
    state = model.state_dict()
    assert all(torch.equal(state[k], evaluated[best_index][1][k]) for k in state)
    metrics = trainer.meta_test(val, metric_key_prefix="test")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and 0.0 < metrics["test_active_fraction"] <= 1.0
    assert 0.0 <= metrics["test_gates_flipped"] <= 1.0


def test_implicit_meta_gradient_through_gated_transformers_resnet(train_classes):
    """The ResNet-from-config path: torch.func's jvp-over-grad runs through transformers' ResNet with gates."""
    from hf_fastslow.modeling.conv4 import resnet_for_few_shot

    torch.manual_seed(5)
    resnet = resnet_for_few_shot(num_labels=5, width=4, depth=2)
    gates = attach_kernel_gates(resnet, budget=0.5)
    episode = EpisodeDataset(train_classes, ways=5, shots=1, queries=2, seed=3)[0]
    loop = InnerLoop(steps=2, lr=0.1, budget=0.5, budget_weight=1.0)
    meta = {n: p.detach() for n, p in resnet.named_parameters()}
    fast = adapt(resnet, meta, episode["support_x"], episode["support_y"], loop, gates)
    v, loss, _ = implicit_meta_gradient(resnet, fast, (episode["support_x"], episode["support_y"]),
                                        (episode["query_x"], episode["query_y"]), loop, 2, 1.0, 10.0, gates)
    assert set(v) == set(meta) and torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(t).all() for t in v.values())
    assert all(v[name].abs().sum() > 0 for name in gates.score_names)
