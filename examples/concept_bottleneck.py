"""Interactive concept bottleneck model: a ResNet built from its config predicts stroke concepts of occluded digits,
a linear head predicts the digit from the concepts only, and at test time a policy asks a "human" (the true
concepts) about one concept group per query.

    python examples/concept_bottleneck.py

Trains with plain transformers.Trainer (about a minute on 2 CPU cores), reloads the model through AutoModel, tunes
CooP's beta on the validation split and prints test accuracy after 0..3 queries for CooP and the baselines.
benchmarks/concept_bottleneck.py runs the full study (3 seeds, all policies, plot).
"""

import tempfile

import torch
from transformers import AutoModel, ResNetConfig, Trainer, TrainingArguments

from hf_fastslow.evaluation.interaction import (
    InterventionStats,
    OracleGreedyPolicy,
    RandomPolicy,
    StaticGreedyPolicy,
    UncertaintyPolicy,
    run_interaction,
    tune_coop,
)
from hf_fastslow.modeling.concept_bottleneck import ConceptBottleneckConfig, ConceptBottleneckModel
from hf_fastslow.modeling.concept_digits import load_concept_digits

torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two on a busy 2-core box
torch.manual_seed(0)
data = load_concept_digits(seed=0)
print(f"{data.n_concepts} concepts in groups {data.concept_groups}: {', '.join(data.concept_names)}")

config = ConceptBottleneckConfig(
    backbone_config=ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                 layer_type="basic"),
    n_concepts=data.n_concepts, n_classes=10, concept_groups=data.concept_groups, concept_names=data.concept_names,
    bottleneck="independent",
)
model = ConceptBottleneckModel(config)
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, num_train_epochs=15, per_device_train_batch_size=64, learning_rate=1e-2,
                             save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data.train).train()
    model.save_pretrained(out + "/cbm")
    model = AutoModel.from_pretrained(out + "/cbm").eval()  # no trust_remote_code: the class is registered
print(f"reloaded through AutoModel: {type(model).__name__}, bottleneck {model.config.bottleneck}")

with torch.no_grad():
    val_logits = model(pixel_values=data.validation.pixel_values).concept_logits
    test_logits = model(pixel_values=data.test.pixel_values).concept_logits
stats = InterventionStats.fit(val_logits, fmt=model.config.intervention_format)  # 5th / 95th percentiles
print(f"revealed concepts are set to r(0) = {stats.low:.3f}, r(1) = {stats.high:.3f}")
val = dict(concept_logits=val_logits, concept_labels=data.validation.concept_labels, labels=data.validation.labels)
test = dict(concept_logits=test_logits, concept_labels=data.test.concept_labels, labels=data.test.labels)

coop, _ = tune_coop(model.label_head, groups=model.config.concept_groups, stats=stats,
                    influences=("confidence_change_v1", "expected_confidence_change"), **val)
print(f"CooP tuned on validation: influence {coop.influence}, beta {coop.beta}")
policies = {
    "CooP": coop, "uncertainty": UncertaintyPolicy(),
    "static": StaticGreedyPolicy().fit(model.label_head, groups=model.config.concept_groups, stats=stats, **val),
    "random": RandomPolicy(seed=0), "oracle": OracleGreedyPolicy(),
}
for name, policy in policies.items():
    trace = run_interaction(model, policy, stats=stats, steps=3, **test)
    accs = ", ".join(f"{100 * a:.1f}" for a in trace.accuracy_per_step)
    print(f"{name:12} test accuracy after 0..3 queries: {accs}  (area {100 * trace.area_under_curve(3):.1f})")

everything = run_interaction(model, OracleGreedyPolicy(), stats=stats, **test)
print(f"all {len(model.config.concept_groups)} groups revealed: accuracy {100 * everything.accuracy_per_step[-1]:.1f}")
