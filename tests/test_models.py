"""Properties every whole model (flows.model.FlowModel) must satisfy, parametrized over
all of them like the Bijection CASES: decode(encode(x)) == x; log_prob is the prior
term plus the log-det of the brute-force Jacobian of x -> all latents (float64);
sampling at temperature 0 is deterministic; the encoding says exact or bound."""
from functools import partial

import pytest
import torch

from flows import LABELS, LOWRES, Cascade, DiffusionPrior, Glow, HierarchicalFlow, PixelDiffusion, SRFlow
from flows.dequantization import GaussianNoiseDequantizer, VariationalDequantizer
from flows.denoiser import TimeConditionedUNet
from flows.nets import ResNetCouplingNet
from flows.quantization import dequantize
from tests.conftest import perturb_parameters
from tests.standin_prior import StandInDiffusionPrior

TINY_SR = dict(scales=1, steps_per_scale=2, hidden_channels=4, rrdb_features=4, rrdb_blocks=1, rrdb_growth=2)


def labels(n):
    return torch.arange(n) % 3


def glow_case(**kwargs):
    def build(n):
        model = Glow(image_size=4, scales=2, steps_per_scale=2, hidden_channels=4, **kwargs)
        x = torch.rand(n, 3, 4, 4) - 0.5
        return model, x, {LABELS: labels(n)}
    return build


def nsf_case(n):
    """The Neural Spline Flow baseline (seed 003): Glow with RQ-spline couplings and the
    ResNet coupling network."""
    model = Glow(in_channels=1, image_size=8, scales=2, steps_per_scale=2, hidden_channels=4, coupling="spline",
                 num_bins=4, tail_bound=1.0, coupling_net=lambda i, o, h: ResNetCouplingNet(i, o, h, num_blocks=1))
    return model, torch.rand(n, 1, 8, 8) - 0.5, {}


def realnvp_case(n):
    """RealNVP (flows/realnvp.py): Glow's multi-scale seam with checkerboard and channel
    couplings."""
    from flows.realnvp import RealNVP
    model = RealNVP(in_channels=1, image_size=8, scales=2, couplings=2, hidden_channels=4,
                    coupling_net=lambda i, o, h: ResNetCouplingNet(i, o, h, num_blocks=1))
    return model, torch.rand(n, 1, 8, 8) - 0.5, {}


def tarflow_case(n, num_classes=0, dequantizer=None):
    """TarFlow (flows/tarflow.py): two causal-transformer blocks over 2x2 patches, the
    second in reversed patch order; class-conditional with a null-class label (-1)."""
    from flows.tarflow import TarFlow
    model = TarFlow(in_channels=3, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8, num_classes=num_classes, dequantizer=dequantizer)
    cond = {LABELS: torch.tensor([0, 2, -1, 1][:n])} if num_classes else {}
    return model, torch.rand(n, 3, 4, 4) - 0.5, cond


def tiny_denoiser(in_channels, out_channels, image_size):
    return TimeConditionedUNet(in_channels, out_channels, image_size, base_channels=8, channel_mults=(1, 2),
                               num_res_blocks=1, attention_resolutions=(2,), dropout=0.0, num_heads=2)


def diffusion_flow_case(n):
    """Seed 003's diffusion-augmented flow: a Glow whose gathered latent has a DDPM prior."""
    model = Glow(image_size=4, scales=2, steps_per_scale=2, hidden_channels=4, coupling="spline", num_bins=4,
                 joint_prior=lambda shape: DiffusionPrior(shape, tiny_denoiser, timesteps=6, schedule="cosine"))
    return model, torch.rand(n, 3, 4, 4) - 0.5, {}


def pixel_diffusion_case(n):
    model = PixelDiffusion(in_channels=3, image_size=4, n_bits=5, denoiser=tiny_denoiser, timesteps=6,
                           schedule="cosine")
    return model, dequantize(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8), 5), {}


def srflow_case(n):
    model = SRFlow(image_size=4, **TINY_SR)
    return model, torch.rand(n, 3, 4, 4) - 0.5, {LOWRES: torch.rand(n, 3, 2, 2) - 0.5}


def cascade_case(n, num_classes=0):
    base = Glow(image_size=2, scales=1, steps_per_scale=2, hidden_channels=4, num_classes=num_classes)
    model = Cascade(base=base, sr_stages=[SRFlow(image_size=4, num_classes=num_classes, **TINY_SR)], n_bits=5)
    uint8 = {r: torch.randint(0, 256, (n, 3, r, r), dtype=torch.uint8) for r in (2, 4)}
    x = {r: dequantize(u, 5) for r, u in uint8.items()}
    clean = {r: dequantize(u, 5, noise=False) for r, u in uint8.items()}
    return model, x, {LOWRES: clean, LABELS: labels(n)}


def hierarchical_case(n):
    from tests.test_hierarchical import tiny_levels
    model = HierarchicalFlow(levels=tiny_levels(), skip_channels=3, top_temperature=None)
    return model, torch.rand(n, 3, 8, 8) - 0.5, {}


# Models that lift x into more dimensions (latents of its y's too): log p(x) is not a
# change of variables; tests/test_hierarchical.py checks each flow and the bound instead.
LIFTED = {"hierarchical"}
# Models whose encode is the identity with a zero log-det (a pixel DDPM: its latent is the
# image): the round trip and the Jacobian would hold by construction, so they are not
# run; tests/test_diffusion.py checks its bound instead (it sums to at most 1 over all
# images, and nearly 1 with the Bayes-optimal denoiser).
IDENTITY_ENCODING = {"pixel_diffusion"}
# Models whose training objective carries a one-step random estimate of the bound (a
# DDPM's), which evaluation replaces with the full bound (FlowModel.evaluation_log_prob).
ESTIMATED = {"diffusion_flow", "pixel_diffusion"}

# name: (factory(n) -> (model, x, cond), exact)
CASES = {
    "glow": (glow_case(), True),
    "glow_class_conditional": (glow_case(num_classes=3), True),
    "glow_additive_full_invconv": (glow_case(coupling="additive", invconv="full"), True),
    "glow_squish": (glow_case(scale_fn="squish"), True),
    # Flow++ dequantization: the flow is exact (encode), the objective a bound (below).
    "glow_variational_dequantization": (glow_case(dequantizer=partial(
        VariationalDequantizer, hidden_channels=4, steps=2, context_channels=2)), True),
    "glow_standin_diffusion_prior": (glow_case(top_prior=lambda shape: StandInDiffusionPrior(shape)), False),
    "nsf": (nsf_case, True),
    "realnvp": (realnvp_case, True),
    "tarflow": (tarflow_case, True),
    "tarflow_class_conditional": (lambda n: tarflow_case(n, num_classes=3), True),
    # Noise augmentation: the density of noisy data, its samples denoised (Tweedie).
    "tarflow_noise_augmented": (lambda n: tarflow_case(n, dequantizer=partial(GaussianNoiseDequantizer,
                                                                             noise_std=0.05)), True),
    "diffusion_flow": (diffusion_flow_case, False),
    "pixel_diffusion": (pixel_diffusion_case, False),
    "srflow": (srflow_case, True),
    "cascade": (cascade_case, False),
    "cascade_class_conditional": (lambda n: cascade_case(n, num_classes=3), False),
    "hierarchical": (hierarchical_case, False),
}


def build(name, n=3, dtype=torch.float32):
    factory, exact = CASES[name]
    torch.manual_seed(0)
    model, x, cond = factory(n)
    model.train()
    with torch.no_grad():
        model.encode(x, cond)  # ActNorm's data-dependent initialization
    perturb_parameters(model, 0.05)
    model = model.to(dtype).eval()
    x = {r: v.to(dtype) for r, v in x.items()} if isinstance(x, dict) else x.to(dtype)
    cond = {k: ({r: t.to(dtype) for r, t in v.items()} if isinstance(v, dict)
                else v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
    return model, x, cond, exact


def flat(value) -> torch.Tensor:
    """Tensors, lists and {resolution: ...} nests -> one [B, D] tensor, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return value.flatten(1)
    if isinstance(value, dict):
        return torch.cat([flat(value[k]) for k in sorted(value)], dim=1)
    return torch.cat([flat(v) for v in value], dim=1)


def unflat(vector, like):
    if isinstance(like, dict):
        out, offset = {}, 0
        for k in sorted(like):
            size = like[k][0].numel()
            out[k] = vector[offset:offset + size].reshape(1, *like[k].shape[1:])
            offset += size
        return out
    return vector.reshape(1, *like.shape[1:])


def first(x, cond, i):
    pick = (lambda v: {r: t[i:i + 1] for r, t in v.items()} if isinstance(v, dict) else v[i:i + 1])
    return pick(x), {k: pick(v) for k, v in cond.items()}


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
