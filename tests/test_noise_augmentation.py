"""Gaussian noise augmentation and score-based denoising (TarFlow sec. 2.3;
flows/dequantization.py GaussianNoiseDequantizer, FlowModel.denoise): the figure of noisy
data is named apart from bits per dim, denoising is Tweedie's posterior mean, and the
models that cannot take either say so."""
import csv
import math

import pytest
import torch

from flows import Glow
from flows.dequantization import GaussianNoiseDequantizer, UniformDequantizer, standard_normal_from_uniform
from flows.tarflow import TarFlow
from tests.conftest import REPO
from tests.commands import QUICKSTART, run_main

NOISE = ["--config", str(REPO / "experiments/noise_augmentation.yaml")]


def noisy(noise_std=0.05, denoise_samples=True):
    return lambda channels: GaussianNoiseDequantizer(channels, noise_std, denoise_samples)


def test_denoising_a_gaussian_model_gives_the_exact_posterior_mean():
    """Data x ~ N(m, s^2) per dim, y = x + sigma eps ~ N(m, s^2 + sigma^2). A TarFlow
    whose blocks are the identity (their zero-initialized output) and whose learned
    prior is N(m, s^2 + sigma^2) models y exactly; its denoised y must be
    E[x | y] = m + s^2 / (s^2 + sigma^2) (y - m), through the model's own autograd pass."""
    torch.manual_seed(0)
    sigma, s = 0.05, 0.1
    model = TarFlow(in_channels=2, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8, learn_prior_scale=True, dequantizer=noisy(sigma)).double().eval()
    m = torch.tensor([0.1, -0.2], dtype=torch.float64).view(1, 2, 1, 1)
    with torch.no_grad():
        model.prior.mean.copy_(m)
        model.prior.log_std.fill_(0.5 * math.log(s ** 2 + sigma ** 2))
    y = m + math.sqrt(s ** 2 + sigma ** 2) * torch.randn(5, 2, 4, 4, dtype=torch.float64)
    closed_form = torch.distributions.Normal(m, math.sqrt(s ** 2 + sigma ** 2)).log_prob(y).flatten(1).sum(1)
    assert torch.allclose(model.log_prob(y), closed_form, atol=1e-8)  # the model is that Gaussian
    posterior_mean = m + s ** 2 / (s ** 2 + sigma ** 2) * (y - m)
    assert (model.denoise(y) - posterior_mean).abs().max() < 1e-4
    assert (y - posterior_mean).abs().max() > 1e-2  # denoising moved the samples


def test_samples_are_denoised_unless_asked_not_to_be():
    torch.manual_seed(0)
    model = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=8, blocks=2, layers_per_block=1,
                    head_channels=4, dequantizer=noisy(0.1)).eval()
    torch.manual_seed(1)
    denoised = model.sample(3)
    model.dequantizer.denoise_samples = False
    torch.manual_seed(1)
    raw = model.sample(3)
    assert torch.allclose(denoised, model.denoise(raw), atol=1e-6)
    assert not torch.allclose(denoised, raw, atol=1e-4)
    with torch.inference_mode():  # as in Lightning's validation and test loops (grids, FID)
        assert torch.allclose(model.denoise(raw), denoised, atol=1e-6)


def test_the_gaussian_noise_has_its_std_and_evaluation_noise_fixes_it():
    q = GaussianNoiseDequantizer(3, noise_std=0.05)
    clean = torch.zeros(64, 3, 8, 8)
    out = q(clean, 2.0 ** -5)
    assert out.continuous and out.exact and torch.equal(out.log_q, torch.zeros(64))
    assert abs(out.images.std().item() - 0.05) < 0.003 and abs(out.images.mean().item()) < 0.003
    uniform = torch.rand(64, 3, 8, 8)
    assert torch.equal(q(clean, 2.0 ** -5, uniform).images, q(clean, 2.0 ** -5, uniform).images)
    eps = standard_normal_from_uniform(uniform)
    assert torch.allclose(torch.special.ndtr(eps), uniform.clamp(1e-6, 1 - 1e-6), atol=1e-5)  # the inverse CDF


def test_the_noisy_data_figure_is_logged_under_its_own_name_and_never_as_bits_per_dim(tmp_path, capsys):
    """The quickstart with the overlay: val/noisy_data_nll_bits_16 is logged and is
    -log p(y) / (D log 2) (no n_bits term); no val/bpd_16 or bound is; the metrics table
    keeps it apart."""
    code, err = run_main(capsys, "fit", *QUICKSTART, *NOISE, "--trainer.callbacks.monitor", "val/noisy_data_nll_bits_16",
                         "--trainer.logger", '{"class_path": "pytorch_lightning.loggers.CSVLogger", '
                         f'"init_args": {{"save_dir": "{tmp_path}", "name": "noisy"}}}}',
                         "--trainer.default_root_dir", str(tmp_path))
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    keys = {k for r in rows for k, v in r.items() if v}
    assert "val/noisy_data_nll_bits_16" in keys, keys
    assert not [k for k in keys if "bpd" in k], keys


def test_a_checkpoint_monitoring_bits_per_dim_is_told_to_monitor_the_noisy_figure(tmp_path, capsys):
    code, err = run_main(capsys, "fit", *QUICKSTART, *NOISE, "--trainer.default_root_dir", str(tmp_path))
    assert code != 0
    assert "monitor val/noisy_data_nll_bits_16" in err, err[-3000:]


def test_the_figure_is_the_density_of_the_noisy_data_in_bits_per_dim():
    """The objective of a noisy-data model is -log p(y) / (D log 2) with y the bin
    centres plus the dequantizer's noise: no bin volume is added."""
    from lightning_modules import GlowModule
    from lightning_modules.family import NOISY_DATA_METRIC, bpd_name

    torch.manual_seed(0)
    flow = Glow(in_channels=3, image_size=8, scales=2, steps_per_scale=1, hidden_channels=8, dequantizer=noisy(0.05))
    module = GlowModule(flow=flow, n_bits=5).eval()
    uint8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batch = module.prepare_batch({"images": {8: uint8}, "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)})
    with torch.no_grad():
        out = module.compute_losses(batch)
        y = flow.dequantizer(batch.clean[8], 2.0 ** -5, batch.noise[8]).images
        expected = -flow.log_prob(y) / (flow.dims * math.log(2.0))
    assert out.continuous == {8}
    assert torch.allclose(-out.log_prob[8] / (flow.dims * math.log(2.0)), expected, atol=1e-5)
    assert torch.allclose(out.loss, expected.mean(), atol=1e-5)
    assert bpd_name(8, True, continuous=True) == f"{NOISY_DATA_METRIC}_8" and "bpd" not in NOISY_DATA_METRIC


def test_models_that_cannot_take_noise_or_denoising_say_so():
    from flows import SRFlow
    from flows.cascade import Cascade
    from flows.diffusion import DiffusionPrior
    from tests.builders import tiny_unet

    with pytest.raises(ValueError, match="not trained on noisy data"):
        Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4).denoise(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="denoise_samples: false"):
        Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4, dequantizer=noisy(),
             joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=4))
    base = Glow(in_channels=3, image_size=8, scales=1, steps_per_scale=1, hidden_channels=4, dequantizer=noisy())
    sr = SRFlow(image_size=16, scales=1, steps_per_scale=1, hidden_channels=4, rrdb_features=4, rrdb_blocks=1,
                rrdb_growth=2)
    with pytest.raises(ValueError, match="a cascade composes discrete likelihoods"):
        Cascade(base=base, sr_stages=[sr])
    assert isinstance(Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4).dequantizer,
                      UniformDequantizer)
