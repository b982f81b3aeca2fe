"""The rational-quadratic spline (Neural Spline Flows, seed 003 sec. 3.2.2.b): invertible,
monotonic, exact log-derivatives, identity in the tails and at zero parameters; and the
ResNet coupling network its baseline uses."""
import pytest
import torch

from flows import Glow
from flows.layers import SplineCoupling, rational_quadratic_spline
from flows.nets import ResNetCouplingNet
from lightning_modules import GlowModule

K, B = 5, 3.0


def random_params(n, scale=2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)

    def draw(size):
        return (scale * torch.randn(n, size, generator=generator)).to(dtype)
    return draw(K), draw(K), draw(K - 1)


def spline(inputs, params, inverse=False, **kwargs):
    return rational_quadratic_spline(inputs, *params, inverse=inverse, tail_bound=B, **kwargs)


@pytest.mark.parametrize("dtype, scale, tolerance", [(torch.float32, 0.5, 1e-5), (torch.float64, 3.0, 1e-9)])
def test_round_trip_and_logdets_cancel(dtype, scale, tolerance):
    # float32 at moderate parameters: with raw parameters of size 3 the slope reaches
    # e^-13 somewhere, where no float32 inverse can be accurate (an ulp of y is 0.1 in
    # x), so the steep/flat regime is checked in float64.
    params = random_params(2000, scale, dtype)
    x = torch.linspace(-1.3 * B, 1.3 * B, 2000, dtype=dtype)
    y, logdet = spline(x, params)
    x_back, logdet_inverse = spline(y, params, inverse=True)
    assert y.dtype == dtype and logdet.dtype == dtype
    assert (x_back - x).abs().max() < tolerance
    assert (logdet + logdet_inverse).abs().max() < 10 * tolerance


def test_logabsdet_is_the_autograd_derivative_in_float64():
    params = random_params(500)
    x = torch.linspace(-1.2 * B, 1.2 * B, 500, dtype=torch.float64, requires_grad=True)
    y, logdet = spline(x, params)
    (derivative,) = torch.autograd.grad(y.sum(), x)  # elementwise: d y_i / d x_i
    assert torch.allclose(logdet, derivative.log(), atol=1e-10)
    z = y.detach().requires_grad_(True)
    x_back, logdet_inverse = spline(z, params, inverse=True)
    (inverse_derivative,) = torch.autograd.grad(x_back.sum(), z)
    assert torch.allclose(logdet_inverse, inverse_derivative.log(), atol=1e-8)


def test_monotonic_and_onto_the_interval():
    params = tuple(p[:1].expand(4001, -1) for p in random_params(1, scale=3.0))
    x = torch.linspace(-B, B, 4001, dtype=torch.float64)
    y, _ = spline(x, params)
    assert (y[1:] > y[:-1]).all()
    assert y[0] == -B and y[-1] == B


def test_identity_in_the_tails_and_c1_at_the_bound():
    params = random_params(6, scale=3.0)
    x = torch.tensor([-10.0, -B - 1e-3, -B - 1e-9, B + 1e-9, B + 1e-3, 7.5], dtype=torch.float64)
    for inverse in (False, True):
        y, logdet = spline(x, params, inverse=inverse)
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros_like(logdet))
    # At the bound, from inside, the spline is the identity with slope 1 (boundary
    # derivatives fixed to 1): the map is C1 across +-B.
    bound = torch.tensor([-B, B], dtype=torch.float64)
    y, logdet = spline(bound, tuple(p[:2] for p in params))
    assert torch.allclose(y, bound, atol=1e-12) and logdet.abs().max() < 1e-12


def test_zero_parameters_are_the_identity():
    x = torch.linspace(-2 * B, 2 * B, 101)
    zeros = (torch.zeros(101, K), torch.zeros(101, K), torch.zeros(101, K - 1))
    y, logdet = spline(x, zeros)
    assert (y - x).abs().max() < 1e-6 and logdet.abs().max() < 1e-6


def test_inverse_equals_bisection_on_the_forward():
    params = random_params(300)
    target = (torch.rand(300, dtype=torch.float64) * 2 - 1) * B * 1.1
    low = torch.full_like(target, -2 * B)
    high = torch.full_like(target, 2 * B)
    for _ in range(60):
        middle = (low + high) / 2
        below = spline(middle, params)[0] < target
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    inverse, _ = spline(target, params, inverse=True)
    assert torch.allclose(inverse, (low + high) / 2, atol=1e-9)


def test_gradients_are_finite_at_bin_edges_and_the_bound():
    raw = [p.clone().requires_grad_(True) for p in random_params(1)]
    with torch.no_grad():
        widths = torch.softmax(raw[0], -1)
        widths = 1e-3 + (1 - 1e-3 * K) * widths
        knots = torch.cat([torch.zeros(1, 1, dtype=widths.dtype), widths.cumsum(-1)], -1) * 2 * B - B
    edges = torch.cat([knots[0], torch.tensor([-2 * B, 2 * B], dtype=knots.dtype)])
    for inverse in (False, True):
        x = edges.clone().requires_grad_(True)
        params = tuple(p.expand(len(edges), -1) for p in raw)
        y, logdet = spline(x, params, inverse=inverse)
        grads = torch.autograd.grad((y + logdet).sum(), [x, *raw])
        assert all(torch.isfinite(g).all() for g in grads)


def test_spline_rejects_a_wrong_number_of_derivatives():
    widths, heights, derivatives = random_params(3)
    with pytest.raises(ValueError, match="K - 1 derivatives"):
        rational_quadratic_spline(torch.zeros(3), widths, heights, torch.cat([derivatives, derivatives[:, :1]], 1),
                                  inverse=False, tail_bound=B)


def test_spline_coupling_starts_as_the_identity_and_sizes_its_net():
    layer = SplineCoupling(4, 8, num_bins=6, tail_bound=2.0, net=ResNetCouplingNet)
    assert layer.params_per_entry == 17 and layer.net.out.conv.out_channels == 2 * 17
    x = torch.randn(3, 4, 4, 4) * 2
    y, logdet = layer(x)
    assert (y - x).abs().max() < 1e-5 and logdet.abs().max() < 1e-4


def test_resnet_coupling_net_blocks_and_output_shape():
    net = ResNetCouplingNet(3, 10, 16, num_blocks=3)
    assert len(net.blocks) == 3
    out = net(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10, 8, 8) and torch.equal(out, torch.zeros_like(out))  # zero-initialized output
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    first, second = net(torch.randn(1, 3, 8, 8)), net(torch.randn(1, 3, 8, 8))
    assert not torch.allclose(first, second)


def test_a_spline_glow_is_named_nsf():
    def tiny(**kwargs):
        return Glow(in_channels=1, image_size=8, scales=2, steps_per_scale=1, hidden_channels=4, **kwargs)
    assert GlowModule(flow=tiny(coupling="spline")).model_name == "NSF8"
    assert GlowModule(flow=tiny(coupling="spline", num_classes=3)).model_name == "NSFCC8"
    assert GlowModule(flow=tiny()).model_name == "Glow8"
