import tempfile

import pytest
import torch
from transformers import AutoConfig, AutoModel, ConvNextConfig, ResNetConfig, ViTConfig

from hf_fastslow.modeling.concept_bottleneck import (
    ConceptBottleneckConfig,
    ConceptBottleneckModel,
    intervene,
    validate_concept_groups,
)

TINY_RESNET = dict(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
TINY_VIT = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=32)
TINY_CONVNEXT = dict(num_channels=1, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)


def tiny_model(bottleneck="independent", backbone=None, groups=((0, 1), (2,), (3,)), **kw):
    config = ConceptBottleneckConfig(backbone_config=backbone or ResNetConfig(**TINY_RESNET), n_concepts=4,
                                     n_classes=3, concept_groups=[list(g) for g in groups], bottleneck=bottleneck, **kw)
    return ConceptBottleneckModel(config).eval()


@pytest.mark.parametrize("groups, message", [
    ([[0, 1], [1, 2], [3]], "must not overlap"),
    ([[0, 1], [2]], r"concepts \[3\] are in no group"),
    ([[0, 1], [2, 4], [3]], "outside 0..3"),
    ([[0, 1, 2, 3], []], "is empty"),
])
def test_groups_that_do_not_partition_the_concepts_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        validate_concept_groups(groups, 4)
    with pytest.raises(ValueError, match=message):
        ConceptBottleneckConfig(n_concepts=4, concept_groups=groups)


def test_config_errors_and_defaults():
    with pytest.raises(ValueError, match="bottleneck must be one of"):
        ConceptBottleneckConfig(bottleneck="sequentialish")
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        ConceptBottleneckConfig(n_classes=1)
    with pytest.raises(ValueError, match="concept_names"):
        ConceptBottleneckConfig(n_concepts=2, concept_names=["a"])
    config = ConceptBottleneckConfig(n_concepts=3)
    assert config.concept_groups == [[0], [1], [2]]
    assert config.backbone_config.model_type == "resnet" and config.backbone_config.num_channels == 1
    assert ConceptBottleneckConfig(bottleneck="joint").intervention_format == "logits"
    assert ConceptBottleneckConfig(bottleneck="joint_sigmoid").intervention_format == "probs"


@pytest.mark.parametrize("backbone", [ResNetConfig(**TINY_RESNET), ViTConfig(**TINY_VIT),
                                      ConvNextConfig(**TINY_CONVNEXT)], ids=["resnet", "vit", "convnext"])
def test_any_vision_backbone_from_config_saves_and_reloads_through_auto_classes(backbone):
    model = tiny_model("joint", backbone)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.logits.shape == (3, 3) and out.concept_logits.shape == (3, 4)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        assert isinstance(config, ConceptBottleneckConfig)
        assert config.concept_groups == [[0, 1], [2], [3]] and config.bottleneck == "joint"
        assert config.backbone_config.model_type == backbone.model_type
        reloaded = AutoModel.from_pretrained(folder).eval()
    assert type(reloaded) is ConceptBottleneckModel
    with torch.no_grad():
        again = reloaded(pixel_values=x)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(again.concept_logits, out.concept_logits, rtol=0, atol=0)


def test_bottleneck_reads_logits_or_sigmoid():
    x = torch.randn(2, 1, 8, 8)
    for bottleneck, fn in (("joint", lambda t: t), ("joint_sigmoid", torch.sigmoid), ("independent", torch.sigmoid)):
        model = tiny_model(bottleneck)
        with torch.no_grad():
            out = model(pixel_values=x)
        torch.testing.assert_close(out.bottleneck, fn(out.concept_logits))
        torch.testing.assert_close(out.logits, model.label_head(fn(out.concept_logits)))


def test_intervention_in_forward_overwrites_only_the_masked_entries():
    model = tiny_model("joint_sigmoid")
    x = torch.randn(2, 1, 8, 8)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    values = torch.full((2, 4), 0.9)
    with torch.no_grad():
        plain = model(pixel_values=x)
        out = model(pixel_values=x, intervention_mask=mask, concept_values=values)
    expected = torch.where(mask, values, torch.sigmoid(plain.concept_logits))
    torch.testing.assert_close(out.bottleneck, expected)
    torch.testing.assert_close(out.logits[1], plain.logits[1])
    assert not torch.allclose(out.logits[0], plain.logits[0])
    # everything revealed: the label head applied to the given values, whatever the image
    with torch.no_grad():
        full = model(pixel_values=x, intervention_mask=torch.ones(2, 4, dtype=torch.bool), concept_values=values)
    torch.testing.assert_close(full.logits, model.label_head(values))
    with pytest.raises(ValueError, match="must both match"):
        intervene(torch.zeros(2, 4), torch.ones(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="go together"):
        model(pixel_values=x, intervention_mask=mask)


def test_losses_per_bottleneck():
    x, concepts, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4, 4)).float(), torch.tensor([0, 1, 2, 0])
    model = tiny_model("independent", concept_loss_weight=0.5).train()
    out = model(pixel_values=x, concept_labels=concepts, labels=labels)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.concept_logits, concepts)
    # independent + training: the label head learns from the true concepts, never from the predicted ones
    ce = torch.nn.functional.cross_entropy(model.label_head(concepts), labels)
    torch.testing.assert_close(out.loss, 0.5 * bce + ce)
    with pytest.raises(ValueError, match="trains its label head on concept_labels"):
        model(pixel_values=x, labels=labels)
    model.eval()  # at test time the loss is the deployed pipeline's: the label head on sigmoid(concept logits)
    out = model(pixel_values=x, concept_labels=concepts, labels=labels)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.concept_logits, concepts)
    torch.testing.assert_close(out.logits, model.label_head(torch.sigmoid(out.concept_logits)))
    torch.testing.assert_close(out.loss, 0.5 * bce + torch.nn.functional.cross_entropy(out.logits, labels))
    joint = tiny_model("joint").train()
    out = joint(pixel_values=x, concept_labels=concepts, labels=labels)
    out.loss.backward()
    assert joint.backbone.embedder.embedder.convolution.weight.grad.abs().sum() > 0


def test_trainer_detects_both_label_names_and_trains(tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.utils.generic import find_labels

    from hf_fastslow.modeling.concept_digits import load_concept_digits

    data = load_concept_digits(seed=0, image_size=8)
    model = ConceptBottleneckModel(ConceptBottleneckConfig(
        backbone_config=ResNetConfig(**TINY_RESNET), n_concepts=data.n_concepts, n_classes=10,
        concept_groups=data.concept_groups, concept_names=data.concept_names))
    assert set(find_labels(ConceptBottleneckModel)) == {"concept_labels", "labels"}
    before = model.concept_head.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    result = Trainer(model=model, args=args, train_dataset=data.train).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.concept_head.weight)
    model.save_pretrained(tmp_path / "cbm")
    reloaded = AutoModel.from_pretrained(tmp_path / "cbm")
    assert reloaded.config.concept_names == data.concept_names


def test_digit_concepts_are_derived_as_documented():
    from hf_fastslow.modeling.concept_digits import SEGMENTS, load_concept_digits, segment_groups, segment_matrix

    codes = segment_matrix()
    assert len({tuple(row) for row in codes.tolist()}) == 10  # every digit has its own stroke code
    assert segment_groups() == [[0], [1, 5], [6], [2, 4], [3]]  # rows: a | b f | g | c e | d
    a = load_concept_digits(seed=3)
    b = load_concept_digits(seed=3)
    assert torch.equal(a.test.pixel_values, b.test.pixel_values)
    assert len(a.train) + len(a.validation) + len(a.test) == 1797
    validate_concept_groups(a.concept_groups, a.n_concepts)
    labels = torch.cat([a.train.labels, a.validation.labels, a.test.labels])
    concepts = torch.cat([a.train.concept_labels, a.validation.concept_labels, a.test.concept_labels])
    torch.testing.assert_close(concepts[:, :len(SEGMENTS)], torch.from_numpy(codes)[labels])
    for c in range(10):  # pen-style attributes: about half of every class, so they carry no label information
        share = concepts[labels == c, len(SEGMENTS):].mean(0)
        assert ((share > 0.4) & (share < 0.6)).all(), share
    only = load_concept_digits(seed=3, style=False)
    assert only.n_concepts == 7 and only.concept_groups == segment_groups()
