"""Mixed precision (bf16-mixed, 16-mixed) and the channels-last / compile flags. The
fragile numerics (log-dets, slogdet, the 1x1-conv inverse, priors, the loss) stay in
float32 or wider."""
import pytest
import torch

from flows import LOWRES, Glow
from lightning_modules import GlowModule
from tests.conftest import perturb_parameters
from tests.builders import cascade_module, pyramid_batch, pyramid_data, tiny_cascade
from tests.conftest import trainer


def test_bf16_autocast_log_prob_is_float32_and_close_to_float32():
    glow = Glow(in_channels=3, image_size=16, scales=2, steps_per_scale=4, hidden_channels=32)
    x = torch.rand(8, 3, 16, 16) - 0.5
    glow.train()
    glow.log_prob(x)  # ActNorm initialization
    perturb_parameters(glow, 0.02)
    glow.eval()
    with torch.no_grad():
        reference = glow.log_prob(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = glow.encode(x)
    assert mixed.log_prob.dtype == torch.float32 and mixed.logdet.dtype == torch.float32
    # bf16 carries 8 bits of mantissa in the convolutions; the log-density stays within 1%.
    assert ((mixed.log_prob - reference).abs() / reference.abs()).max() < 1e-2


def test_bf16_autocast_cascade_likelihood_and_sampling():
    cascade = tiny_cascade()
    images, clean, _ = pyramid_batch()
    with torch.no_grad():
        reference = cascade.log_likelihoods(images, {LOWRES: clean})[32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = cascade.log_likelihoods(images, {LOWRES: clean})[32]
            samples = cascade.sample(2, None, 0.8)
    assert mixed.dtype == torch.float32
    assert ((mixed - reference).abs() / reference.abs()).max() < 1e-3
    assert all(torch.isfinite(s).all() for s in samples.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_bf16_and_fp16_mixed_training_steps(tmp_path, precision):
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = cascade_module(grad_clip_norm=1.0)
    if precision == "16-mixed":
        # Lightning maps 16-mixed on CPU to bf16; build fp16 with a GradScaler explicitly,
        # as it runs on GPUs (the path that must unscale before clipping).
        kwargs = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    else:
        kwargs = dict(precision=precision)
    run = trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=4, **kwargs)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run.fit(module, pyramid_data(top=16))
    assert torch.isfinite(run.callback_metrics["val/bpd_bound_16"])
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert int(module.skipped_steps) == 0
    if precision == "16-mixed":
        assert run.precision_plugin.scaler is not None
        # Clipping saw unscaled gradients: the logged norm is the true one, not scale x it.
        assert float(run.callback_metrics["train/grad_norm"]) < 1e3


def fresh_glow_loss(batch, **flags):
    """The loss of a freshly built small Glow on ``batch``, with the given flags."""
    torch.manual_seed(0)
    module = GlowModule(flow=Glow(image_size=16, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5,
                        **flags).eval()
    module.configure_model()
    torch.manual_seed(1)
    prepared = module.prepare_batch(batch)
    with torch.no_grad():
        return module.compute_losses(prepared).loss, module


def validation_batch():
    data = pyramid_data(top=16)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def test_channels_last_gives_the_same_loss():
    batch = validation_batch()
    eager, _ = fresh_glow_loss(batch)
    channels_last, _ = fresh_glow_loss(batch, channels_last=True)
    assert torch.allclose(eager, channels_last, rtol=1e-5)


@pytest.mark.slow
def test_compiled_loss_equals_eager():
    batch = validation_batch()
    eager, _ = fresh_glow_loss(batch)
    compiled, module = fresh_glow_loss(batch, compile=True)
    assert torch.allclose(eager, compiled, rtol=1e-4)
    assert "_orig_mod" not in "".join(module.state_dict())
