"""Glow model properties: exact inversion, consistent likelihoods, priors, sampling."""
import math

import pytest
import torch

from flows import LABELS, Glow
from flows.distributions import KEPT
from flows.quantization import bits_per_dim
from lightning_modules import Batch, GlowModule
from tests.conftest import perturb_parameters


def small_glow(**kwargs):
    defaults = dict(in_channels=3, image_size=8, scales=2, steps_per_scale=2, hidden_channels=16)
    defaults.update(kwargs)
    return Glow(**defaults)


def glow_module(n_bits=8, class_loss_weight=0.01, **kwargs):
    return GlowModule(flow=small_glow(**kwargs), n_bits=n_bits, class_loss_weight=class_loss_weight)


def batch_of(x, labels):
    """``x`` as already dequantized: bin centres x with noise 1/2 give back x."""
    return Batch({x.shape[-1]: x}, {x.shape[-1]: x}, labels, {x.shape[-1]: torch.full_like(x, 0.5)})


def initialized(model, x):
    model.train()
    with torch.no_grad():
        y = torch.zeros(x.shape[0], dtype=torch.long)
        model.encode(x, {LABELS: y})  # ActNorm data-dependent init
    perturb_parameters(model, 0.02)
    return model.eval()


@pytest.mark.parametrize("kwargs", [{}, {"invconv": "full", "coupling": "additive"},
                                    {"scale_fn": "squish"}, {"num_classes": 4}])
def test_decode_encode_is_identity(kwargs):
    x = torch.rand(6, 3, 8, 8) - 0.5
    y = torch.arange(6) % 4
    model = initialized(small_glow(**kwargs), x)
    with torch.no_grad():
        encoding = model.encode(x, {LABELS: y})
        x_back, logdet_inverse = model.decode_with_logdet(encoding.latents, {LABELS: y})
    assert len(encoding.latents) == 2
    assert (x_back - x).abs().max() < 1e-4
    assert torch.allclose(encoding.logdet + logdet_inverse, torch.zeros(6), atol=1e-3)


def test_log_prob_is_per_sample_and_matches_batch_loss():
    module = glow_module(scales=2, steps_per_scale=2, hidden_channels=16, n_bits=8)
    x = torch.rand(5, 3, 8, 8) - 0.5
    initialized(module.model, x)
    module.eval()
    with torch.no_grad():
        batch = module.model.log_prob(x)
        singles = torch.cat([module.model.log_prob(x[i:i + 1]) for i in range(5)])
        out = module.compute_losses(batch_of(x, torch.zeros(5, dtype=torch.long)))
    assert batch.shape == (5,)
    assert torch.allclose(batch, singles, atol=1e-3)
    expected_loss = bits_per_dim(batch, 3 * 64, 8).mean()
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)


def test_log_prob_equals_change_of_variables_of_latents():
    """log p(x) = sum of prior log-densities of all latents + log|det|, recomputed here
    from the latents with the priors' own parameters."""
    from flows.distributions import gaussian_log_prob

    x = torch.rand(4, 3, 8, 8) - 0.5
    model = initialized(small_glow(), x)
    with torch.no_grad():
        enc = model.encode(x)
        top_mean, top_log_std = model.top_prior.params(4)
        kept = enc.latents[-1]
        # Rebuild the kept half at the split: run scale 2 inverse from the top latent.
        scale2_input, _ = model.scales[1].inverse(kept)
        split_mean, split_log_std = model.split_priors[0].params({KEPT: scale2_input})
        manual = (gaussian_log_prob(enc.latents[-1], top_mean, top_log_std)
                  + gaussian_log_prob(enc.latents[0], split_mean, split_log_std) + enc.logdet)
    assert torch.allclose(enc.log_prob, manual, atol=1e-3)


def test_bits_per_dim_at_initialization_on_uniform_noise_is_plausible():
    # Uniform noise over all 256 levels has an entropy of exactly 8 bits/dim; a fresh
    # Glow (ActNorm initialized on that data) is a Gaussian fit: a bit above 8.
    model = Glow(in_channels=3, image_size=16, scales=2, steps_per_scale=4, hidden_channels=32).train()
    x = torch.rand(64, 3, 16, 16) - 0.5
    with torch.no_grad():
        bpd = bits_per_dim(model.log_prob(x), 3 * 16 * 16, 8).mean().item()
    assert math.isfinite(bpd)
    assert 8.0 < bpd < 8.6


def test_temperature_scales_sampled_latents():
    model = small_glow(scales=2).eval()
    with torch.no_grad():
        model.top_prior.mean.normal_()
        model.top_prior.log_std.uniform_(-1.0, 0.5)
        for temperature in (0.3, 0.7, 1.0):
            x = model.sample(512, None, temperature)
            enc = model.encode(x)
            mean, log_std = model.top_prior.params(512)
            standardized = (enc.latents[-1] - mean) / log_std.exp()
            assert abs(standardized.std().item() - temperature) < 0.03 * temperature + 0.01
            assert abs(standardized.mean().item()) < 0.03


def test_class_conditional_sampling_uses_the_requested_class_prior():
    model = small_glow(num_classes=3).eval()
    with torch.no_grad():
        # Class c shifts the top prior's mean by 5c.
        channels = model.top_prior.shape[0]
        model.top_prior.class_embedding.weight.zero_()
        for c in range(3):
            model.top_prior.class_embedding.weight[:channels, c] = 5.0 * c
        y = torch.tensor([0, 1, 2, 2, 1, 0])
        x = model.sample(6, {LABELS: y}, 0.5)
        top = model.encode(x, {LABELS: y}).latents[-1]
    per_sample_mean = top.mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample_mean, 5.0 * y.float(), atol=0.6)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 3\)"):
        model.top_prior.params(2, {LABELS: torch.tensor([0, 3])})


def test_class_head_loss_is_weighted_into_the_objective():
    module = glow_module(scales=2, steps_per_scale=1, hidden_channels=8, num_classes=4, class_loss_weight=0.5)
    x = torch.rand(4, 3, 8, 8) - 0.5
    y = torch.tensor([0, 1, 2, 3])
    initialized(module.model, x)
    with torch.no_grad():
        module.model.class_head.weight.zero_()
        module.model.class_head.bias.zero_()
        out = module.compute_losses(batch_of(x, y))
        bpd = bits_per_dim(module.model.log_prob(x, {LABELS: y}), 192, 8).mean()
    # A fresh class head gives uniform logits: cross-entropy log(4) nats = 2 bits.
    assert torch.allclose(out.extra["class_bits"], torch.tensor(2.0), atol=1e-3)
    assert torch.allclose(out.loss, bpd + 0.5 * 2.0, atol=1e-4)


def test_actnorm_does_not_reinitialize_after_checkpoint_load(tmp_path):
    module = glow_module(scales=2, steps_per_scale=1, hidden_channels=8)
    module.train()
    module.model.encode(torch.rand(8, 3, 8, 8) - 0.5)
    path = tmp_path / "state.pt"
    torch.save(module.state_dict(), path)
    fresh = glow_module(scales=2, steps_per_scale=1, hidden_channels=8)
    fresh.load_state_dict(torch.load(path))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.train()
    fresh.model.encode(torch.randn(8, 3, 8, 8) * 10)  # very different statistics
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_glow_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Glow(in_channels=3, image_size=12, scales=3, steps_per_scale=1, hidden_channels=4)
    model = small_glow()
    with pytest.raises(ValueError, match="expects images"):
        model.encode(torch.zeros(2, 1, 8, 8))
