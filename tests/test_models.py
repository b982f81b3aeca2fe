"""Properties every whole model (flows.model.FlowModel) must satisfy, parametrized over
all of them like the Bijection CASES: decode(encode(x)) == x; log_prob is the prior
term plus the log-det of the brute-force Jacobian of x -> all latents (float64);
sampling at temperature 0 is deterministic; the encoding says exact or bound."""
import pytest
import torch

from flows.quantization import dequantize
from tests.standin_prior import StandInDiffusionPrior
from tests.model_cases import CASES, ESTIMATED, IDENTITY_ENCODING, LIFTED, build, first, flat, unflat


@pytest.mark.parametrize("name", sorted(set(CASES) - IDENTITY_ENCODING))
def test_decode_of_encode_is_identity(name):
    model, x, cond, _ = build(name)
    with torch.no_grad():
        back = model.decode(model.encode(x, cond).latents, cond)
    assert (flat(back) - flat(x)).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(set(CASES) - IDENTITY_ENCODING - LIFTED))
def test_log_prob_is_prior_term_plus_brute_force_log_det(name):
    """(Lifted models are left out: their log_prob is a variational bound, not a change of
    variables.)"""
    model, x, cond, _ = build(name, n=2, dtype=torch.float64)
    torch.manual_seed(0)  # the same draws for a stochastic bound's two evaluations
    encoding = model.encode(x, cond)
    for i in range(2):
        x_i, cond_i = first(x, cond, i)

        def latents(vector, cond_i=cond_i, x_i=x_i):
            return flat(model.encode(unflat(vector, x_i), cond_i).latents)[0]

        jacobian = torch.autograd.functional.jacobian(latents, flat(x_i)[0])
        assert jacobian.shape[0] == jacobian.shape[1]  # every dimension kept as a latent
        log_det = torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(encoding.log_prob[i], encoding.log_prior[i] + log_det, atol=1e-8), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampling_at_temperature_zero_is_deterministic(name):
    model, x, cond, _ = build(name)
    n = flat(x).shape[0]
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        samples.append(flat(model.sample(n, cond, 0.0)))
    assert torch.equal(samples[0], samples[1])
    torch.manual_seed(3)
    assert not torch.equal(flat(model.sample(n, cond, 1.0)), samples[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_says_exact_or_bound(name):
    model, x, cond, exact = build(name)
    with torch.no_grad():
        encoding = model.encode(x, cond)
    assert encoding.exact is exact and model.exact is exact
    assert encoding.log_prob.shape == (flat(x).shape[0],)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in ("cascade", "cascade_class_conditional")))
def test_training_objective_is_the_dequantized_likelihood_and_says_exact_or_bound(name):
    """``training_loss`` minimizes bits per dim of log p(x + u) - log q(u | x) at the
    model's dequantization, and is exact only where both the flow and q are (a cascade's
    stages are checked in tests/test_cascade.py). The same noise gives the same figure as
    encoding the dequantized images by hand."""
    from flows.quantization import bits_per_dim, noisy_data_bits
    model, x, cond, exact = build(name)
    n_bits = 5
    clean = dequantize(((x + 0.5) * 255).round().clamp(0, 255).to(torch.uint8), n_bits, noise=False)
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    objective = model.training_loss(clean, cond, n_bits=n_bits, noise=noise)
    assert objective.exact is (exact and model.dequantizer.exact), name
    dequantized = model.dequantizer(clean, 2.0 ** -n_bits, noise)
    assert objective.continuous is model.dequantizer.continuous, name
    if not objective.continuous:  # noise augmentation leaves the bins on purpose
        assert ((dequantized.images - clean).abs() <= 2.0 ** -n_bits / 2 + 1e-6).all()  # within its bin
    torch.manual_seed(1)
    by_hand = model.encode(dequantized.images, cond).log_prob - dequantized.log_q
    assert objective.estimated is (name in ESTIMATED), name
    if objective.estimated:
        # A DDPM's one-step estimate of its bound (tests/test_diffusion.py checks it is
        # unbiased and what it minimizes); evaluation reports the full bound, as by hand.
        torch.manual_seed(1)
        evaluated = model.evaluation_log_prob(clean, cond, n_bits=n_bits, noise=noise)
        assert torch.allclose(evaluated, by_hand, atol=1e-4, rtol=1e-5), name
        return
    assert torch.allclose(objective.log_prob, by_hand, atol=1e-4, rtol=1e-5), name
    if name not in LIFTED:  # the hierarchical flow minimizes eq. 12's weighted terms (test_hierarchical.py)
        figure = noisy_data_bits(by_hand, model.dims) if objective.continuous else bits_per_dim(by_hand, model.dims, n_bits)
        assert torch.allclose(objective.loss, figure.mean(), atol=1e-5)
    if not model.dequantizer.exact:
        assert (dequantized.log_q.abs() > 1e-6).any()  # perturbed: q is not uniform


STANDIN_CONFIG = """
model:
  class_path: lightning_modules.GlowModule
  init_args:
    n_bits: 5
    optimizer: {lr: 1.0e-3, warmup_steps: 1}
    flow:
      class_path: flows.Glow
      init_args:
        image_size: 16
        scales: 2
        steps_per_scale: 1
        hidden_channels: 8
        top_prior:
          class_path: tests.standin_prior.StandInDiffusionPrior
          init_args: {steps: 3}
data:
  class_path: datamodules.EmbeddedDataModule
  init_args: {image_size: 16, resolutions: [16], train_size: 32, val_size: 8, batch_size: 8}
trainer:
  accelerator: cpu
  max_steps: 2
  limit_val_batches: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
"""


def test_a_diffusion_like_prior_plugs_into_glow_from_yaml(tmp_path):
    """Any LatentPrior is a Glow top prior by class_path; its bound carries through
    the contract to the logged figure's name."""
    from lightning_modules.cli import build_cli

    config = tmp_path / "standin.yaml"
    config.write_text(STANDIN_CONFIG)
    cli = build_cli(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    prior = cli.model.model.top_prior
    assert isinstance(prior, StandInDiffusionPrior) and prior.steps == 3 and prior.shape == (24, 4, 4)
    assert not cli.model.model.exact
    before = prior.gap.detach().clone()
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert "train/bpd_bound_16" in metrics and "train/bpd_16" not in metrics
    assert not torch.equal(prior.gap.detach(), before)  # the prior's parameters train with the flow


def test_any_single_model_without_parts_trains_under_the_density_module():
    """GlowModule takes any FlowModel of one image size (here seed 001's hierarchical flow,
    whose objective is eq. 12, not bits per dim): its loss and logged bound are the
    model's own objective, flagged a bound, with no family code in the module."""
    from lightning_modules import GlowModule
    from lightning_modules.family import Batch
    model, x, cond, _ = build("hierarchical")
    module = GlowModule(flow=model, n_bits=5).train()
    clean = dequantize(((x + 0.5) * 255).round().to(torch.uint8), 5, noise=False)
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out = module.compute_losses(Batch({8: clean}, {8: clean}, torch.zeros(3, dtype=torch.long), {8: noise}))
    torch.manual_seed(3)
    objective = model.training_loss(clean, None, n_bits=5, noise=noise)
    assert torch.allclose(out.loss, objective.loss) and torch.allclose(out.log_prob[8], objective.log_prob)
    assert out.exact == {8: False} and "level_bpd_prior" in out.extra


def test_exactness_is_derived_from_the_parts_not_declared_per_model():
    """A model built from exact parts is exact without saying so; one bound prior anywhere
    below it (even inside a nested model) makes it a bound; a learned dequantizer leaves
    the encoding exact (it joins at the objective); a structural bound overrides."""
    from flows import FlowModel
    from flows.distributions import GaussianPrior

    class TwoPriors(FlowModel):
        def __init__(self, second):
            super().__init__(None, 3)
            self.first, self.inner = GaussianPrior((3, 4, 4)), torch.nn.ModuleList([second])

    assert TwoPriors(GaussianPrior((3, 4, 4))).exact
    assert not TwoPriors(StandInDiffusionPrior((3, 4, 4))).exact
    assert not TwoPriors(build("diffusion_flow")[0]).exact  # a nested model's own derivation counts
    assert TwoPriors(build("glow_variational_dequantization")[0]).exact
    assert not build("cascade")[0].exact and not build("hierarchical")[0].exact
