"""Every whole model (flows.model.FlowModel) at a test's size, by name: CASES maps a name
to (factory(n) -> (model, x, cond), exact). The model tests parametrize over it, and so
do the parts invariant and the host-sync checks, so a new family is one entry here."""
from functools import partial

import torch

from flows import LABELS, LOWRES, Cascade, DiffusionPrior, Glow, HierarchicalFlow, PixelDiffusion, SRFlow
from flows.dequantization import GaussianNoiseDequantizer, VariationalDequantizer
from flows.nets import ResNetCouplingNet
from flows.quantization import dequantize
from tests.builders import tiny_denoiser, tiny_levels
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
