"""Classifier-free guidance for every class-conditional family (flows/base.py
``drop_labels`` and ``guided``; GaussianPrior.sample for GlowCC and each cascade stage,
TarFlow's per-step transforms in tests/test_tarflow.py): label dropout trains the null
class on that share of the labels, w = 0 is conditional sampling, w extrapolates from
the null class, and guided samples of a toy problem are classified better as w rises."""
import pytest
import torch

from flows import GUIDANCE, LABELS, LOWRES, NULL_LABEL, GaussianPrior, Glow, SRFlow, TarFlow
from flows.cascade import Cascade
from flows.quantization import dequantize
from tests.conftest import perturb_parameters


def tiny(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "tarflow":
        model = TarFlow(in_channels=3, image_size=8, patch_size=2, channels=32, blocks=2, layers_per_block=2,
                        head_channels=16, num_classes=3, **kwargs)
    else:
        model = Glow(in_channels=3, image_size=8, scales=2, steps_per_scale=1, hidden_channels=8, num_classes=3,
                     **kwargs)
    perturb_parameters(model, 0.05)
    return model.eval()


@pytest.mark.parametrize("kind", ["tarflow", "glow"])
def test_label_dropout_trains_the_null_class_on_that_fraction_of_the_labels(kind):
    model = tiny(kind, label_dropout=0.5).train()
    uint8 = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    clean, noise = dequantize(uint8, 5, noise=False), torch.rand(8, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model.eval()  # no ActNorm initialization or other training-only work below but the dropout
    model.training = True
    torch.manual_seed(3)
    dropped_run = model.training_loss(clean, {LABELS: labels}, n_bits=5, noise=noise)
    torch.manual_seed(3)
    dropped = torch.rand(labels.shape) < 0.5
    assert 0 < int(dropped.sum()) < 8
    model.label_dropout = 0.0
    by_hand = model.training_loss(clean, {LABELS: torch.where(dropped, NULL_LABEL, labels)}, n_bits=5, noise=noise)
    kept = model.training_loss(clean, {LABELS: labels}, n_bits=5, noise=noise)
    assert torch.allclose(dropped_run.log_prob, by_hand.log_prob)
    assert not torch.allclose(dropped_run.log_prob[dropped], kept.log_prob[dropped])
    if kind == "glow":  # the class head still learns the true classes
        assert torch.allclose(dropped_run.terms["class_bits"], kept.terms["class_bits"])
    model.label_dropout = 0.5
    model.training = False  # evaluation never drops labels
    assert torch.allclose(model.training_loss(clean, {LABELS: labels}, n_bits=5, noise=noise).log_prob,
                          kept.log_prob)


def test_the_guided_gaussian_prior_extrapolates_mean_and_log_std_from_the_null_class():
    torch.manual_seed(0)
    prior = GaussianPrior((2, 3, 3), num_classes=2)
    perturb_parameters(prior, 0.3)
    labels, w = torch.tensor([0, 1, 1]), 1.5
    mean, log_std = prior.params(3, {LABELS: labels})
    null_mean, null_log_std = prior.params(3, {LABELS: torch.full_like(labels, NULL_LABEL)})
    assert not torch.allclose(mean, null_mean)
    torch.manual_seed(1)
    drawn = prior.sample(3, {LABELS: labels, GUIDANCE: w})
    torch.manual_seed(1)
    eps = torch.randn(3, 2, 3, 3)
    expected = mean + w * (mean - null_mean) + torch.exp(log_std + w * (log_std - null_log_std)) * eps
    assert torch.allclose(drawn, expected, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"\[0, 2\) or be -1"):
        prior.params(1, {LABELS: torch.tensor([-2])})


@pytest.mark.parametrize("kind", ["tarflow", "glow"])
def test_w_zero_is_conditional_sampling_and_the_models_own_weight_applies_where_a_call_names_none(kind):
    model = tiny(kind)
    labels = torch.tensor([0, 1, 2, 0])

    def draw(cond):
        torch.manual_seed(5)
        with torch.no_grad():
            return model.sample(4, cond)

    conditional = draw({LABELS: labels})
    assert torch.equal(draw({LABELS: labels, GUIDANCE: 0.0}), conditional)
    guided = draw({LABELS: labels, GUIDANCE: 2.0})
    assert (guided - conditional).abs().max() > 1e-3
    model.guidance = 2.0
    assert torch.equal(draw({LABELS: labels}), guided)
    assert torch.equal(draw({LABELS: labels, GUIDANCE: 0.0}), conditional)  # a call's weight wins
    with torch.no_grad():  # the model's weight guides what is drawn, never a given latent's decoding
        encoding = model.encode(conditional, {LABELS: labels})
        assert (model.decode(encoding.latents, {LABELS: labels}) - conditional).abs().max() < 1e-4


def test_every_stage_of_a_class_conditional_cascade_is_guided():
    """GlowCC8 -> SRFlow16 with classes: with w = 0 every resolution's samples are the
    conditional ones; with w > 0 the base moves, and so does the SR stage given the same
    low-resolution image (its own class prior is guided)."""
    torch.manual_seed(0)
    base = Glow(in_channels=3, image_size=8, scales=1, steps_per_scale=1, hidden_channels=8, num_classes=2)
    sr = SRFlow(image_size=16, scales=1, steps_per_scale=1, hidden_channels=4, rrdb_features=4, rrdb_blocks=1,
                rrdb_growth=2, num_classes=2)
    cascade = Cascade(base=base, sr_stages=[sr], n_bits=5)
    perturb_parameters(cascade, 0.05)
    cascade.eval()
    labels = torch.tensor([0, 1, 1])

    def draw(model, n, cond):
        torch.manual_seed(7)
        with torch.no_grad():
            return model.sample(n, cond)

    conditional = draw(cascade, 3, {LABELS: labels})
    unguided = draw(cascade, 3, {LABELS: labels, GUIDANCE: 0.0})
    assert all(torch.equal(unguided[r], conditional[r]) for r in (8, 16))
    guided = draw(cascade, 3, {LABELS: labels, GUIDANCE: 3.0})
    assert (guided[8] - conditional[8]).abs().max() > 1e-3
    lowres = {LOWRES: conditional[8], LABELS: labels}
    sr_conditional = draw(sr, 3, lowres)
    sr_guided = draw(sr, 3, {**lowres, GUIDANCE: 3.0})
    assert (sr_guided - sr_conditional).abs().max() > 1e-3


@pytest.mark.parametrize("model_name", ["tarflow", "glow"])
def test_guided_samples_of_a_toy_two_class_problem_are_classified_better_as_w_rises(model_name):
    """benchmarks/guidance.py, shortened: two overlapping Gaussian classes, a
    class-conditional model trained with label dropout; the Bayes rule's accuracy on its
    samples rises from w = 0 to w = 3."""
    from benchmarks.guidance import train_and_measure

    result = train_and_measure(steps=200, samples=1000, weights=(0.0, 3.0), model_name=model_name)
    accuracy = result["accuracy"]
    # the data's own Bayes accuracy is about 0.72 (m = 0.03): room for guidance to show
    assert accuracy[3.0] > accuracy[0.0] + 0.1, result
    assert accuracy[0.0] > 0.6, result  # the conditional model learned the classes at all


def test_guidance_needs_classes():
    with pytest.raises(ValueError, match="needs classes"):
        Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4, guidance=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4, num_classes=2,
             label_dropout=1.0)
