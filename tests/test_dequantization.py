"""Dequantizers as parts of the model (flows/dequantization.py): the learned q(u | x) is a
proper density on [0, 1)^D, starts as the uniform q, samples what it evaluates, and the
likelihood built on it is a lower bound on the discrete log-probability."""
import math
from functools import partial

import pytest
import torch

from flows.dequantization import UniformDequantizer, VariationalDequantizer
from flows.glow import Glow
from flows.model import Encoding, FlowModel
from tests.conftest import REPO, perturb_parameters


def random_q(in_channels=1, scale=0.3, seed=0):
    torch.manual_seed(seed)
    q = VariationalDequantizer(in_channels, hidden_channels=8, steps=2, context_channels=4).double()
    perturb_parameters(q, scale)  # off the identity start, so q is not uniform
    return q


def test_q_integrates_to_one_in_one_dimension():
    """A one-pixel image: q(u | x) on [0, 1), integrated numerically. The integral runs in
    h = logit(u), where the integrand q(sigmoid(h)) sigmoid'(h) has light tails."""
    q = random_q()
    clean = torch.full((1, 1, 1, 1), 0.1, dtype=torch.float64)
    h = torch.linspace(-30.0, 30.0, 120001, dtype=torch.float64)
    u = torch.sigmoid(h).view(-1, 1, 1, 1)
    with torch.no_grad():
        log_q = q.log_prob(u, clean.expand(len(h), -1, -1, -1))
    integrand = torch.exp(log_q + torch.nn.functional.logsigmoid(h) + torch.nn.functional.logsigmoid(-h))
    total = torch.trapezoid(integrand, h).item()
    assert abs(total - 1.0) < 1e-3, total
    density = torch.exp(log_q)[(u.flatten() > 0.05) & (u.flatten() < 0.95)]
    assert density.max() / density.min() > 1.5  # a real, non-uniform density was integrated


def test_forward_samples_the_density_it_evaluates():
    """log q returned with a sample equals log_prob of that sample (the sign and the
    sigmoid's Jacobian in both directions)."""
    q = random_q(in_channels=3, scale=0.1)
    clean = torch.rand(4, 3, 4, 4, dtype=torch.float64) - 0.5
    width = 2.0 ** -5
    with torch.no_grad():
        out = q(clean, width)
        u = (out.images - clean) / width + 0.5
        assert ((u > 0) & (u < 1)).all()
        assert torch.allclose(q.log_prob(u, clean), out.log_q, atol=1e-8)
    assert not out.exact


def test_variational_starts_as_uniform():
    torch.manual_seed(0)
    q, uniform = VariationalDequantizer(3), UniformDequantizer()
    clean, noise = torch.rand(2, 3, 8, 8) - 0.5, torch.rand(2, 3, 8, 8)
    learned, plain = q(clean, 1 / 32, noise), uniform(clean, 1 / 32, noise)
    assert torch.allclose(learned.images, plain.images, atol=1e-6)
    assert learned.log_q.abs().max() < 1e-3 and plain.log_q.abs().max() == 0


class OnePixelGaussian(FlowModel):
    """p(y) = N(y; 0.05, 0.2^2) on one pixel: its bin probabilities are known in closed form."""

    in_channels, image_size = 1, 1

    def __init__(self, dequantizer):
        super().__init__(lambda channels: dequantizer)

    def encode(self, x, cond=None):
        z = (x - 0.05) / 0.2
        log_prior = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return Encoding([z], torch.full_like(log_prior, -math.log(0.2)), log_prior)


@pytest.mark.parametrize("dequantizer", ["uniform", "variational"])
def test_bound_is_below_the_discrete_log_probability(dequantizer):
    """E_q[log p(y) - log q(u | x)] + log(bin width) <= log P(bin), by Jensen; the Monte
    Carlo estimate (2e5 draws) is far tighter than the gap a wrong sign would open."""
    n_bits, width = 2, 0.25
    q = UniformDequantizer() if dequantizer == "uniform" else random_q(scale=0.5).float()
    model = OnePixelGaussian(q)
    normal = torch.distributions.Normal(0.05, 0.2)
    for k in range(4):
        low = k * width - 0.5
        exact = math.log(float(normal.cdf(torch.tensor(low + width)) - normal.cdf(torch.tensor(low))))
        clean = torch.full((200000, 1, 1, 1), low + width / 2)
        torch.manual_seed(k)
        with torch.no_grad():
            objective = model.training_loss(clean, n_bits=n_bits)
        bound = objective.log_prob.double().mean().item() + math.log(width)
        assert bound <= exact + 1e-3, (k, bound, exact)
        if dequantizer == "uniform":
            assert bound > exact - 0.5  # the Jensen gap of a Gaussian over one bin is small
        assert objective.exact is (dequantizer == "uniform")


def test_glow_takes_a_dequantizer_from_its_arguments():
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4,
                 dequantizer=partial(VariationalDequantizer, hidden_channels=4, steps=1, context_channels=2))
    clean = torch.rand(2, 1, 4, 4) - 0.5
    objective = model.training_loss(clean, n_bits=5)
    assert objective.exact is False and objective.log_prob.shape == (2,)
    objective.loss.backward()  # q trains jointly: its parameters get gradients
    assert all(p.grad is not None for p in model.dequantizer.parameters())
    assert model.dequantizer.in_channels == 1  # the factory was given the model's channels
    with pytest.raises(ValueError, match="in_channels: 3"):
        Glow(in_channels=3, image_size=4, scales=1, steps_per_scale=1, hidden_channels=4,
             dequantizer=lambda channels: VariationalDequantizer(1))


@pytest.mark.parametrize("config, overlay", [
    ("quick_photos.yaml", True),  # Glow
    ("nsf_mnist.yaml", True),    # NSF (one channel)
    ("quick_cascade.yaml", False),  # a cascade's base stage, from the command line
])
def test_shipped_models_take_variational_dequantization_from_yaml(config, overlay, tmp_path):
    """The overlay config (or one command-line option for a cascade's base stage) gives
    the model a learned q with the data's channel count, and the module logs a bound."""
    from lightning_modules.cli import build_cli

    text = (REPO / "experiments" / config).read_text()
    (tmp_path / config).write_text("".join(line for line in text.splitlines(keepends=True)
                                           if not line.startswith("ckpt_path:")))
    args = ["--config", str(tmp_path / config), "--trainer.logger", "false"]
    if overlay:
        args += ["--config", str(REPO / "experiments" / "variational_dequantization.yaml")]
    else:
        args += ["--model.init_args.base.flow.init_args.dequantizer",
                 '{"class_path": "flows.dequantization.VariationalDequantizer", "init_args": {"steps": 2}}']
    module = build_cli(args, run=False).model
    model = module.model.stage(module.model.base_resolution) if not overlay else module.model
    assert isinstance(model.dequantizer, VariationalDequantizer)
    assert model.dequantizer.in_channels == model.in_channels
    resolution = model.image_size
    uint8 = {r: torch.randint(0, 256, (2, model.in_channels, r, r), dtype=torch.uint8) for r in module.resolutions}
    module.train()
    out = module.compute_losses(module.prepare_batch({"images": uint8, "label": torch.zeros(2, dtype=torch.long)}))
    assert out.exact[resolution] is False
    assert torch.isfinite(out.loss)


def test_a_config_monitoring_bpd_keeps_its_best_checkpoint_when_the_likelihood_becomes_a_bound(tmp_path, capsys):
    """The photo quickstart monitors val/bpd_32 (here val/bpd_16); with the overlay the module logs
    val/bpd_bound_32 instead (never val/bpd_32), and ModelCheckpoint ranks by it."""
    import csv

    from tests.commands import QUICKSTART, run_main
    code, err = run_main(capsys, "fit", *QUICKSTART, "--config", str(REPO / "experiments/variational_dequantization.yaml"),
                         "--model.init_args.flow.init_args.dequantizer.init_args.hidden_channels", "4",
                         "--model.init_args.flow.init_args.dequantizer.init_args.steps", "1",
                         "--trainer.logger", '{"class_path": "pytorch_lightning.loggers.CSVLogger", '
                         f'"init_args": {{"save_dir": "{tmp_path}", "name": "vd"}}}}',
                         "--trainer.default_root_dir", str(tmp_path))
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert any(r.get("val/bpd_bound_16") for r in rows) and not any(r.get("val/bpd_16") for r in rows)
    best = [p.name for p in tmp_path.rglob("*.ckpt") if p.name != "last.ckpt"]
    assert best == ["best.ckpt"], best  # tests.test_cli.TINY_QUICKSTART names it
