"""Peer implementations of our models, built from other packages, for side-by-side
benchmarks (``benchmarks/versus_peers.py``). Needs the ``peers`` extra
(``pip install -e '.[peers]'``, i.e. ``normflows>=1.7``).

:func:`build_peer_glow` builds, from normflows' own building blocks, the multi-scale
Glow that ``flows.Glow(in_channels=..., image_size=..., scales=L, steps_per_scale=K,
hidden_channels=...)`` is: per scale, squeeze -> K x (ActNorm, LU-decomposed 1x1 conv,
affine coupling on a channel split whose network is conv3x3-ReLU-conv1x1-ReLU-zero-init
conv3x3) -> split off half the channels (all scales but the last). It follows the
multi-scale recipe of normflows' Glow example: ``nf.flows.GlowBlock`` x K plus
``nf.flows.Squeeze`` per level, ``nf.flows.Merge`` between levels, one base
distribution per level, all in ``nf.MultiscaleFlow``. normflows orders levels from the
coarsest (level 0, the top latent) to the finest, and its ``forward`` is the
generative direction (``inverse`` is x -> z), so its level i is our scale L-1-i.

The builds use the same architecture; what still differs, and why:

* **Priors of the split-off latents.** Ours is Glow's learned *conditional* split
  prior: a zero-initialized 3x3 conv on the kept half gives the mean and log-std of the
  factored-out half. ``nf.MultiscaleFlow`` draws each level's latent from an
  independent base distribution, so normflows has no conditional split prior; every
  level gets ``nf.distributions.GlowBase``, Glow's learned per-channel mean and
  log-scale (our top prior's ``learntop``; normflows stores each as value x
  exp(3 x log-factor), 4 C parameters against our 2 C). The split-prior convs are a
  few thousand parameters (< 0.3 % at K=8, hidden 128) and a negligible share of the
  compute; they are the only difference in what the two models can express (the
  differences below are reparametrizations, initialization and numerics).
* **Last conv of the coupling networks.** Ours is Glow's ``conv2d_zeros``, with a
  learned per-channel output log-scale (C parameters per step); normflows'
  ``ConvNet2d`` ends in a plain zero-initialized conv. Both start as the same map.
* **Affine coupling form.** Ours: ``y = s * x + t``; normflows (``scale_map="sigmoid"``,
  OpenAI Glow's order): ``y = s * (x - t)``; ``s = sigmoid(h + 2)`` in both.
* **Initialization.** Our first two coupling convs start at N(0, 0.05) (Glow's code);
  normflows' at PyTorch's default. Both ActNorms initialize from the first batch
  (ours: population std, normflows: unbiased std).
* **Numerics.** Our log-dets and priors run in float32 or wider under bf16 autocast
  (``flows.base.zero_logdet``, ``at_least_float32``); normflows accumulates log-dets in
  the activations' dtype (bf16 under autocast), so its bf16 likelihoods are the less
  precise. When sampling, ours reuses a cached inverse of each 1x1-conv weight while the
  parameters do not change; normflows inverts L and U (in float64) on every call.
* **Options left at their defaults.** normflows' ``net_actnorm=True`` (ActNorm instead of
  bias after the coupling net's hidden convs) is our ``CouplingNet(actnorm=True)``; both
  are off here, as in our default Glow.

Parameter counts agree within 0.3 % for the benchmark configurations (L=3 at 32x32x3,
(K, hidden) in {(8, 128), (32, 512)}); ``python -m benchmarks.peers`` prints and checks
them, and compares bits/dim at initialization.

**Input convention.** Our models take dequantized images x in [-0.5, 0.5); normflows'
Glow example feeds x in [0, 1) (``Scale(255/256)`` + ``Jitter(1/256)``: k/256 + u/256),
with no transform inside the model. :meth:`PeerGlow.nll` therefore evaluates the
normflows model at ``x + 0.5``: a translation, whose Jacobian is 1, so the returned
negative log-density (nats per image) is of the same x as ``-glow.log_prob(x)`` and the
two are directly comparable; bits/dim on 8-bit data is ``(nll + D ln 256) / (D ln 2)``
for both (normflows' example computes ``nll / (D ln 2) + 8``, the same number).
:meth:`PeerGlow.sample` shifts back by -0.5.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# normflows' convention is x in [0, 1), ours x in [-0.5, 0.5): peer input = our x + shift.
NORMFLOWS_INPUT_SHIFT = 0.5


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (buffers such as the LU permutations are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _import_normflows():
    try:
        import normflows
    except ImportError as error:  # the extra is optional: say how to get it
        raise ImportError("the peer benchmarks need normflows: pip install -e '.[peers]'") from error
    return normflows


@dataclass
class PeerGlow:
    """A normflows multi-scale Glow with our models' interface for x in [-0.5, 0.5)."""

    model: nn.Module  # the nf.MultiscaleFlow
    image_shape: tuple[int, int, int]

    def nll(self, x: Tensor) -> Tensor:
        """-log p(x) in nats per image, [B]; directly comparable to ``-glow.log_prob(x)``."""
        return -self.model.log_prob(x + NORMFLOWS_INPUT_SHIFT, None)

    @torch.no_grad()
    def sample(self, n: int, temperature: float | None = None) -> Tensor:
        """n images [n, C, H, W] in our convention (around [-0.5, 0.5))."""
        x, _ = self.model.sample(n, temperature=temperature)
        return x - NORMFLOWS_INPUT_SHIFT


def build_peer_glow(in_channels: int = 3, image_size: int = 32, scales: int = 3, steps_per_scale: int = 8,
                    hidden_channels: int = 128) -> PeerGlow:
    """The normflows model of the same architecture as ``flows.Glow`` with these
    arguments (see the module docstring for what differs)."""
    nf = _import_normflows()
    if scales < 1 or steps_per_scale < 1:
        raise ValueError("Glow needs scales >= 1 and steps_per_scale >= 1")
    if image_size % (2 ** scales):
        raise ValueError(f"image_size {image_size} is not divisible by 2**scales = {2 ** scales}")
    base_distributions, levels, merges = [], [], []
    # normflows level i (0 = coarsest) is our scale L-1-i.
    for level in range(scales):
        scale = scales - 1 - level
        # Channels the K steps of our scale `scale` see: each earlier scale squeezed (x4)
        # and split (/2), this one squeezed.
        channels = in_channels * 4 * 2 ** scale
        size = image_size // 2 ** (scale + 1)
        with warnings.catch_warnings():
            # normflows 1.7.3 factorizes its 1x1 convs with the deprecated Tensor.lu(); not ours to fix.
            warnings.filterwarnings("ignore", message="torch.lu is deprecated")
            steps = [nf.flows.GlowBlock(channels, hidden_channels,
                                        scale=True, scale_map="sigmoid",  # affine, s = sigmoid(h + 2)
                                        split_mode="channel",  # first half conditions, second half transformed
                                        leaky=0.0,  # plain ReLU, as ours
                                        init_zeros=True,  # zero last conv: coupling starts fixed
                                        use_lu=True,  # LU-parametrized 1x1 conv, as ours (invconv="lu")
                                        net_actnorm=False)  # ours has no ActNorm inside the coupling net
                     for _ in range(steps_per_scale)]
        # In the generative direction the squeeze's forward un-squeezes; it ends the level.
        levels.append(steps + [nf.flows.Squeeze()])
        if level == 0:
            latent_shape = (channels, size, size)  # the top latent: all channels of the last scale
        else:
            merges.append(nf.flows.Merge())  # channel concat of [kept, factored out]
            latent_shape = (channels // 2, size, size)  # the half our scale `scale` splits off
        base_distributions.append(nf.distributions.GlowBase(latent_shape))
    model = nf.MultiscaleFlow(base_distributions, levels, merges, transform=None, class_cond=False)
    return PeerGlow(model, (in_channels, image_size, image_size))


def build_ours(in_channels: int = 3, image_size: int = 32, scales: int = 3, steps_per_scale: int = 8,
               hidden_channels: int = 128, **extra) -> nn.Module:
    from flows import Glow

    return Glow(in_channels=in_channels, image_size=image_size, scales=scales, steps_per_scale=steps_per_scale,
                hidden_channels=hidden_channels, **extra)


def bits_per_dim(nll: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of 8-bit data from the continuous nll (nats) of x in a unit-width range."""
    return (nll + num_dims * math.log(256.0)) / (num_dims * math.log(2.0))


def _check(configs: list[tuple[int, int]], batch: int, tolerance: float) -> bool:
    """Print parameter counts, bits/dim at initialization and the sample shape; True when
    every count agrees within ``tolerance`` (relative)."""
    ok = True
    shape = (3, 32, 32)
    num_dims = math.prod(shape)
    print(f"{'K x hidden':>10} {'ours':>12} {'normflows':>12} {'diff %':>7} {'bpd ours':>9} {'bpd peer':>9}")
    for steps, hidden in configs:
        torch.manual_seed(0)
        ours = build_ours(steps_per_scale=steps, hidden_channels=hidden)
        peer = build_peer_glow(steps_per_scale=steps, hidden_channels=hidden)
        ours_count, peer_count = count_parameters(ours), count_parameters(peer.model)
        difference = (ours_count - peer_count) / peer_count
        ok &= abs(difference) <= tolerance
        x = torch.rand(batch, *shape) - 0.5
        with torch.no_grad():
            # The first training-mode pass initializes both models' ActNorms from the batch
            # (normflows' ActNorm initializes on its first call whatever the mode).
            for module in (ours, peer.model):
                module.train()
            ours.log_prob(x)
            peer.nll(x)
            for module in (ours, peer.model):
                module.eval()
            bpd_ours = bits_per_dim(-ours.log_prob(x), num_dims).mean().item()
            bpd_peer = bits_per_dim(peer.nll(x), num_dims).mean().item()
        print(f"{f'{steps} x {hidden}':>10} {ours_count:>12,} {peer_count:>12,} {100 * difference:>7.2f} "
              f"{bpd_ours:>9.3f} {bpd_peer:>9.3f}")
        samples = peer.sample(2)
        if tuple(samples.shape) != (2, *shape) or not torch.isfinite(samples).all():
            print(f"  peer sample: bad shape {tuple(samples.shape)} or non-finite values")
            ok = False
        del ours, peer
    return ok


def main() -> None:
    from benchmarks.versus_peers import parse_configs

    parser = argparse.ArgumentParser(description="Check the normflows Glow against ours: parameter counts, "
                                                 "bits/dim at initialization, sample shape (L=3, 32x32x3).")
    parser.add_argument("--configs", type=parse_configs, default=parse_configs("8x128,32x512"),
                        help="comma-separated KxHIDDEN, e.g. 8x128,32x512")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative parameter-count tolerance")
    args = parser.parse_args()
    ok = _check(args.configs, args.batch, args.tolerance)
    print("parameter counts match" if ok else f"MISMATCH beyond {100 * args.tolerance:.1f} %")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
