"""MetaDOCK: kernel gates adapted per task inside implicit MAML, on few-shot digits (rotations as new classes).

    python examples/metadock.py

A Conv4 (registered with the Auto classes) is meta-trained densely for a few steps with `IMAMLTrainer`, then gated
(one learnable binary gate per 3x3 kernel, budget 50 % active) and meta-trained further; both are adapted to unseen
meta-test digits. A ResNet built from its transformers config takes the same gates. Minutes-long CPU training, so
accuracies are far from converged; benchmarks/metadock.py runs the comparison.
"""

import tempfile
import warnings

import torch
from transformers import AutoModelForImageClassification

from hf_fastslow.evaluation.few_shot import EpisodeDataset, digit_rotation_classes
from hf_fastslow.modeling.conv4 import Conv4Config, Conv4ForImageClassification, resnet_for_few_shot
from hf_fastslow.modeling.kernel_gates import attach_kernel_gates
from hf_fastslow.trainers.imaml_config import IMAMLConfig
from hf_fastslow.trainers.imaml_trainer import IMAMLTrainer

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)
torch.manual_seed(0)
train = EpisodeDataset(digit_rotation_classes("train"), ways=5, shots=1, queries=10, seed=0)
val = EpisodeDataset(digit_rotation_classes("val"), ways=5, shots=1, queries=10, length=20, seed=1)
test = EpisodeDataset(digit_rotation_classes("test"), ways=5, shots=1, queries=10, length=50, seed=2)


def meta_train(model, gates, steps, out):
    args = IMAMLConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                       inner_steps=4, inner_lr=0.1, eval_strategy="steps", eval_steps=5, save_strategy="no",
                       logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                       budget_warmup_steps=max(1, steps // 2))
    trainer = IMAMLTrainer(model=model, args=args, gates=gates, train_dataset=train, eval_dataset=val)
    trainer.train()  # ends on the best meta-validation checkpoint
    return trainer


model = Conv4ForImageClassification(Conv4Config(num_labels=5, hidden_sizes=[32] * 4))
with tempfile.TemporaryDirectory() as out:
    dense = meta_train(model, None, 10, out).meta_test(test)
    print(f"dense iMAML Conv4-32: 5-way 1-shot meta-test accuracy {dense['test_accuracy']:.3f} "
          f"± {dense['test_accuracy_ci95']:.3f}")
    gates = attach_kernel_gates(model, budget=0.5)
    print(f"gates attached to {len(gates)} convs ({gates.num_kernels()} kernels), active fraction "
          f"{gates.active_fraction():.2f}")
    gated = meta_train(model, gates, 10, out).meta_test(test)
    print(f"MetaDOCK Conv4-32 @ 50%: meta-test accuracy {gated['test_accuracy']:.3f} "
          f"± {gated['test_accuracy_ci95']:.3f}, active kernels per task {gated['test_active_fraction']:.2f} "
          f"(std {gated['test_active_fraction_std']:.3f})")
    x = test[0]["query_x"]
    gated_logits = model(x).logits
    gates.bake()  # masks written into the weights: a plain Conv4 again
    model.save_pretrained(out)
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    print(f"baked, saved and reloaded with AutoModelForImageClassification: {type(reloaded).__name__}, "
          f"same logits: {torch.equal(reloaded(x).logits, gated_logits)}")

resnet = resnet_for_few_shot(num_labels=5, width=16)
resnet_gates = attach_kernel_gates(resnet, budget=0.25)
print(f"ResNet from config: {len(resnet_gates)} gated convs, batch-statistics BatchNorm; "
      f"active fraction {resnet_gates.active_fraction():.2f}")
