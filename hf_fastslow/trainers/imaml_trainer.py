"""`IMAMLTrainer`: implicit MAML on `transformers.Trainer`, with MetaDOCK kernel gates adapted in the inner loop.

The Trainer contract fits with one override: a training "batch" is a meta-batch of episodes (`collate_episodes`),
`training_step` adapts fast weights per episode with `torch.func.functional_call`, solves the implicit system by
conjugate gradient on `torch.func` Hessian-vector products, writes the mean meta-gradient into each parameter's
`.grad` and returns the detached query loss; Trainer's optimizer, scheduler, logging and callbacks run unchanged.
`evaluate` is meta-validation: adapt to each validation episode, score its query set (accuracy, 95 % interval, active
kernel fraction per task), and remember the best weights so `train()` can end on them.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from hf_fastslow.evaluation.few_shot import collate_episodes, mean_and_ci95
from hf_fastslow.trainers.imaml_config import IMAMLConfig
from hf_fastslow.trainers.imaml_core import (
    InnerLoop,
    adapt,
    check_batch_statistics,
    evaluate_episodes,
    implicit_meta_gradient,
)


class IMAMLTrainer(Trainer):
    """Implicit MAML. `gates` (from `attach_kernel_gates`) are optional; without them this is dense iMAML.

    Datasets hold episodes (`hf_fastslow.evaluation.few_shot.EpisodeDataset`); `per_device_train_batch_size` is the
    meta-batch. Single process only (the meta-gradient is not all-reduced).
    """

    def __init__(self, model=None, args: IMAMLConfig | None = None, gates=None, data_collator=None, **kwargs):
        if args is None:
            args = IMAMLConfig(output_dir="imaml_output")
        if not isinstance(args, IMAMLConfig):
            raise ValueError(f"IMAMLTrainer needs an IMAMLConfig, got {type(args).__name__}.")
        if args.world_size > 1:
            raise ValueError("IMAMLTrainer runs in a single process (its meta-gradient is not all-reduced).")
        check_batch_statistics(model)
        if gates is not None and gates.model is not model:
            raise ValueError("IMAMLTrainer: `gates` were attached to a different model.")
        self.gates = gates
        self.best_metric: float | None = None
        self.best_state: dict | None = None
        super().__init__(model=model, args=args, data_collator=data_collator or collate_episodes, **kwargs)

    def inner_loop(self, step: int | None = None) -> InnerLoop:
        args = self.args
        step = self.state.global_step if step is None else step
        gated = self.gates is not None
        budget_weight, budget = args.budget_at(step, self.gates.budget if gated else None)
        return InnerLoop(
            steps=args.inner_steps, lr=args.inner_lr, gate_lr=args.gate_inner_lr, lam=args.lam,
            proximal=args.inner_proximal, pull_back=args.pull_back, budget=budget if gated else None,
            budget_weight=budget_weight, gate_l1=args.gate_l1 if gated else 0.0,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        args = self.args
        loop = self.inner_loop()
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        meta = {name: p.detach() for name, p in named.items()}
        totals = {name: torch.zeros_like(p) for name, p in meta.items()}
        tasks = inputs["support_x"].shape[0]
        query_losses = []
        for t in range(tasks):
            support = (inputs["support_x"][t], inputs["support_y"][t])
            query = (inputs["query_x"][t], inputs["query_y"][t])
            fast = adapt(model, meta, *support, loop, self.gates)
            v, query_loss, _ = implicit_meta_gradient(
                model, fast, support, query, loop, args.cg_steps, args.cg_damping, args.lam_damping, self.gates
            )
            query_losses.append(query_loss)
            for name in totals:
                totals[name] += v[name]
        for name, p in named.items():
            meta_grad = totals[name] / tasks
            p.grad = meta_grad if p.grad is None else p.grad + meta_grad
        return torch.tensor(sum(query_losses) / tasks, device=args.device)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Meta-validation: adapt per episode, score the query set; the best accuracy's weights are remembered."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("IMAMLTrainer.evaluate: no eval_dataset (a meta-validation EpisodeDataset).")
        metrics = self.meta_test(dataset, metric_key_prefix=metric_key_prefix)
        key = f"{metric_key_prefix}_accuracy"
        if self.args.keep_best_on_eval and (self.best_metric is None or metrics[key] > self.best_metric):
            self.best_metric = metrics[key]
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            metrics[f"{metric_key_prefix}_best_step"] = float(self.state.global_step)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def meta_test(self, dataset, metric_key_prefix: str = "test") -> dict[str, float]:
        """Accuracy (mean, 95 % half-width), query loss and active kernel fraction (mean, spread) over `dataset`'s
        episodes, each adapted from the current meta-parameters. Never used to pick weights unless passed to
        `evaluate` (keep meta-test tasks out of it)."""
        device = self.args.device
        episodes = ({k: v.to(device) for k, v in dataset[i].items()} for i in range(len(dataset)))
        was_training = self.model.training
        self.model.train()  # batch statistics either way; train mode keeps dropout-free models identical
        result = evaluate_episodes(self.model, episodes, self.inner_loop(), self.gates)
        self.model.train(was_training)
        accuracy, ci95 = mean_and_ci95(result["accuracies"])
        metrics = {
            f"{metric_key_prefix}_accuracy": accuracy,
            f"{metric_key_prefix}_accuracy_ci95": ci95,
            f"{metric_key_prefix}_query_loss": sum(result["losses"]) / len(result["losses"]),
        }
        if result["active_fractions"]:
            fractions = torch.tensor(result["active_fractions"])
            metrics[f"{metric_key_prefix}_active_fraction"] = fractions.mean().item()
            metrics[f"{metric_key_prefix}_active_fraction_std"] = fractions.std().item() if len(fractions) > 1 else 0.0
            metrics[f"{metric_key_prefix}_gates_flipped"] = sum(result["gates_flipped"]) / len(result["gates_flipped"])
        return metrics

    def restore_best(self) -> bool:
        """Load the weights of the best meta-validation accuracy seen so far; False if none was recorded."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state)
        return True

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.keep_best_on_eval:
            self.restore_best()
        return output
