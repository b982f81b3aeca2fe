"""Checkpoints written before the model contract (tests/fixtures, by commit fb80692)
load into today's code and give the same log-probabilities."""
import pytest
import torch

from flows import LABELS, LOWRES, Glow, SRFlow
from lightning_modules import CascadeModule, GlowModule, GlowStage, SRFlowStage
from lightning_modules.checkpoint_files import load_checkpoint_file, read_state_dict
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"


def legacy_glow_module():
    return GlowModule(flow=Glow(in_channels=3, image_size=8, scales=2, steps_per_scale=2, hidden_channels=8,
                                num_classes=4), n_bits=5)


def legacy_cascade_module(**kwargs):
    return CascadeModule(
        base=GlowStage(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8)),
        sr_stages=[SRFlowStage(sigma=0.1, flow=SRFlow(image_size=16, scales=2, steps_per_scale=1, hidden_channels=8,
                                                      rrdb_features=8, rrdb_blocks=2, rrdb_growth=4))],
        n_bits=5, **kwargs)


def resume_load(module, path):
    """What Lightning does with --ckpt_path: the module's hook sees the checkpoint
    first, then the state dict is loaded strictly."""
    checkpoint = load_checkpoint_file(path)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def test_legacy_glow_checkpoint_gives_the_same_log_probabilities():
    io = torch.load(FIXTURES / "legacy_glow_io.pt")
    path = FIXTURES / "legacy_glow.ckpt"
    loaded = legacy_glow_module()
    loaded.load_state_dict(read_state_dict(path, "legacy"))
    for module in (resume_load(legacy_glow_module(), path), loaded.eval()):
        with torch.no_grad():
            log_prob = module.model.log_prob(io["x"], {LABELS: io["labels"]})
        # Float32 agreement (3.5e-7 relative), not bit-for-bit: the LU 1x1 conv weight is
        # now built in float32 (the fixture was written when it was built in float64).
        assert torch.allclose(log_prob, io["log_prob"], atol=1e-5, rtol=1e-6), (log_prob, io["log_prob"])


def test_legacy_cascade_checkpoint_gives_the_same_log_probabilities():
    io = torch.load(FIXTURES / "legacy_cascade_io.pt")
    path = str(FIXTURES / "legacy_cascade.ckpt")
    for module in (resume_load(legacy_cascade_module(), path),
                   legacy_cascade_module(init_checkpoint=path, train_stages=[16]).eval()):
        with torch.no_grad():
            cond = {LOWRES: {8: io["conditions"][16]}}
            stages = {r: module.model.encode_stage(r, io["images"], cond).log_prob for r in (8, 16)}
            likelihoods = module.model.log_likelihoods(io["images"], cond)
        for r in (8, 16):
            # Float32 agreement, as for Glow above (the LU weight is built in float32 now).
            assert torch.allclose(stages[r], io["stage_log_prob"][r], atol=1e-5, rtol=1e-6), r
            assert torch.allclose(likelihoods[r], io["log_likelihood"][r], atol=1e-4, rtol=1e-6), r


def test_legacy_checkpoint_hyper_parameters_of_removed_classes_stay_readable():
    checkpoint = load_checkpoint_file(FIXTURES / "legacy_cascade.ckpt")
    base = checkpoint["hyper_parameters"]["base"]
    assert type(base).__name__ == "GlowLevel" and base.hidden_channels == 8


def test_a_legacy_checkpoint_of_another_architecture_is_refused_with_a_message():
    module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=16, num_classes=4),
                        n_bits=5)
    with pytest.raises(ValueError, match="does not fit"):
        resume_load(module, FIXTURES / "legacy_glow.ckpt")


def legacy_diffusion_flow_module(**module_settings):
    """The fixture's DiffusionFlowModule (tests/fixtures/README.md), with its training
    rule given either to the module (as configs of commit 9352b3f did) or to the prior."""
    import functools

    from flows import DiffusionPrior
    from flows.denoiser import TimeConditionedUNet
    from lightning_modules import DiffusionFlowModule

    unet = functools.partial(TimeConditionedUNet, base_channels=8, channel_mults=[1], num_res_blocks=1,
                             attention_resolutions=[])
    prior_settings = {} if module_settings else {"loss_mode": "bound", "vlb_weight": 1e-3,
                                                 "bound_estimator": "importance"}
    glow = Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                joint_prior=functools.partial(DiffusionPrior, denoiser=unet, timesteps=8, schedule="cosine",
                                              **prior_settings))
    return DiffusionFlowModule(flow=glow, n_bits=5, **module_settings)


@pytest.mark.parametrize("settings", [{}, {"loss_mode": "bound", "vlb_weight": 1e-3, "bound_estimator": "importance"}],
                         ids=["rule-on-the-prior", "rule-on-the-module"])
def test_legacy_diffusion_flow_checkpoint_gives_the_same_bound_loss_and_sampler_history(settings):
    """A diffusion-augmented flow of commit 9352b3f, whose LightningModule computed the
    loss from the model's internals, loads into the model-owned objective: the same
    T-step bound, the same loss (same draws), and the importance sampler's history."""
    io = torch.load(FIXTURES / "legacy_diffusion_flow_io.pt")
    module = resume_load(legacy_diffusion_flow_module(**settings), FIXTURES / "legacy_diffusion_flow.ckpt")
    assert torch.equal(module.timestep_sampler.counts, io["sampler_counts"])
    assert int(io["sampler_counts"].sum()) == 48  # 6 steps x 8 images entered the history
    batch = {"images": {8: io["uint8"]}, "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}
    with torch.no_grad():
        prepared = module.prepare_batch(batch)
        assert torch.allclose(prepared.images[8], io["x"], atol=1e-7)
        torch.manual_seed(7)
        log_prob = module.model.log_prob(prepared.images[8])
        torch.manual_seed(8)
        loss = module.compute_losses(prepared).loss
    assert torch.allclose(log_prob, io["log_prob"], atol=1e-4, rtol=1e-6), (log_prob, io["log_prob"])
    assert loss.item() == pytest.approx(io["loss"].item(), abs=1e-5)
