"""SRFlow stages and the CSRFlow cascade (seed 000 ch. 2.2.4, 3, 4)."""
import math

import pytest
import pytorch_lightning as pl
import torch

from flows import LABELS, LOWRES, Glow, SRFlow
from flows.nets import RRDBEncoder
from flows.quantization import bits_per_dim, dequantize, snap_to_bins
from lightning_modules import CascadeModule, GlowStage, OptimizerSettings, SRFlowStage
from lightning_modules.parts import lr_factor
from tests.builders import (TINY_SR_FLOW, cascade_module, glow_stage, pyramid_batch, pyramid_data,
                            sr_stage, tiny_cascade, tiny_srflow)
from tests.conftest import perturb_parameters, trainer

# --- the SRFlow stage ----------------------------------------------------------------
def test_srflow_round_trip_and_condition_dependence():
    model = tiny_srflow(16)
    perturb_parameters(model, 0.02)
    model.eval()
    x, lr = torch.rand(2, 3, 16, 16) - 0.5, torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        encoding = model.encode(x, {LOWRES: lr})
        x_back = model.decode(encoding.latents, {LOWRES: lr})
        other = model.encode(x, {LOWRES: lr.flip(-1)})
    assert (x_back - x).abs().max() < 1e-4
    assert not torch.allclose(encoding.log_prob, other.log_prob)
    with pytest.raises(ValueError, match="conditions on"):
        model.log_prob(x, {LOWRES: torch.rand(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="lowres"):
        model.log_prob(x)


def test_srflow_log_prob_is_change_of_variables_of_its_flow():
    """log p(x|lr) = log N(f(x; c)) + log|det df/dx| with a brute-force Jacobian."""
    model = SRFlow(image_size=4, scales=1, steps_per_scale=2, hidden_channels=4, rrdb_features=4,
                   rrdb_blocks=1, rrdb_growth=2).double()
    perturb_parameters(model, 0.05)
    model.eval()
    x, lr = torch.rand(1, 3, 4, 4).double() - 0.5, torch.rand(1, 3, 2, 2).double() - 0.5
    cond = model.flow_condition({LOWRES: lr})

    def latent(flat):
        return model.flow.encode(flat.reshape(1, 3, 4, 4), cond).latents[-1].flatten()

    jacobian = torch.autograd.functional.jacobian(latent, x.flatten())
    z = latent(x.flatten()).reshape(1, 12, 2, 2)
    prior = model.flow.top_prior.log_prob(z, cond)
    expected = prior + torch.linalg.slogdet(jacobian).logabsdet
    assert torch.allclose(model.log_prob(x, {LOWRES: lr}), expected, atol=1e-8)


def test_rrdb_taps_the_seed_blocks_and_upsamples():
    encoder = RRDBEncoder(3, num_features=4, num_blocks=23, growth=2)
    assert encoder.feature_blocks == [1, 8, 15, 22]  # SRFlow's choice
    assert encoder.features(torch.rand(1, 3, 4, 4)).shape == (1, 20, 4, 4)
    lowres = torch.rand(1, 3, 4, 4)
    # The zero-init last conv: an untrained encoder is exactly bicubic upsampling.
    bicubic = torch.nn.functional.interpolate(lowres, scale_factor=2, mode="bicubic", align_corners=False)
    assert torch.allclose(encoder(lowres), bicubic)


# --- the cascade's likelihood -----------------------------------------------------------------
def test_cascade_log_likelihood_is_the_sum_of_its_stages():
    cascade = tiny_cascade()
    images, clean, _ = pyramid_batch()
    with torch.no_grad():
        total = cascade.log_likelihoods(images, {LOWRES: clean})[32]
        stages = [cascade.base.log_prob(images[8]),
                  cascade.stage(16).log_prob(images[16], {LOWRES: clean[8]}),
                  cascade.stage(32).log_prob(images[32], {LOWRES: clean[16]})]
        encoding = cascade.encode(images, {LOWRES: clean})
    # Each stage's density times its bin volume (5 bits per dim) is its probability.
    bins = [-3 * r * r * 5 * math.log(2.0) for r in (8, 16, 32)]
    by_hand = sum(lp + b for lp, b in zip(stages, bins))
    assert torch.allclose(total, by_hand, rtol=1e-6)
    # In bits: the cascade's bits equal the sum of the stages' own bits.
    stage_bits = sum(bits_per_dim(lp, 3 * r * r, 5) * 3 * r * r for lp, r in zip(stages, (8, 16, 32)))
    assert torch.allclose(-total / math.log(2.0), stage_bits, rtol=1e-5)
    bpd = -total / (3 * 32 * 32 * math.log(2.0))
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    # The contract's encoding: its log_prob is the density whose Glow bpd is the
    # cascade's bits per dim at the top, and it says it is a bound.
    assert torch.allclose(bits_per_dim(encoding.log_prob, 3 * 32 * 32, 5), bpd, rtol=1e-5)
    assert not encoding.exact and not cascade.exact and cascade.stage_exact(8)


def test_conditions_are_the_bin_centres_of_the_lower_resolution():
    images, clean, uint8 = pyramid_batch()
    assert torch.equal(snap_to_bins(images[16], 5), clean[16])
    assert torch.equal(snap_to_bins(clean[16], 5), clean[16])
    broken = torch.tensor([float("nan"), float("inf"), -float("inf"), 7.0]).reshape(1, 1, 2, 2)
    assert torch.isfinite(snap_to_bins(broken, 5)).all()
    # Without explicit conditions the cascade snaps the lower resolutions of x itself.
    cascade = tiny_cascade()
    with torch.no_grad():
        given = cascade.log_likelihoods(images, {LOWRES: clean})[32]
        derived = cascade.log_likelihoods(images)[32]
    assert torch.allclose(given, derived)


def test_module_logs_cascade_bpd_bounds_and_stage_bpds(tmp_path):
    module = cascade_module(sr_stages=[sr_stage(16), sr_stage(32)])
    data = pyramid_data(top=32)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    module.eval()
    torch.manual_seed(3)
    prepared = module.prepare_batch(batch, noise=True)
    with torch.no_grad():
        out = module.compute_losses(prepared)
        clean = {r: dequantize(batch["images"][r], 5, noise=False) for r in (8, 16)}
        stages = {r: module.model.encode_stage(r, prepared.images, {LOWRES: clean}).log_prob for r in (8, 16, 32)}
        bits = {r: bits_per_dim(stages[r], 3 * r * r, 5) * 3 * r * r for r in (8, 16, 32)}
    # The logged cascade bpd at R is the stages' bits up to R over R's dims.
    cascade_bpd_32 = bits_per_dim(out.log_prob[32], 3 * 32 * 32, 5)
    assert torch.allclose(cascade_bpd_32, (bits[8] + bits[16] + bits[32]) / (3 * 32 * 32), rtol=1e-5)
    cascade_bpd_16 = bits_per_dim(out.log_prob[16], 3 * 16 * 16, 5)
    assert torch.allclose(cascade_bpd_16, (bits[8] + bits[16]) / (3 * 16 * 16), rtol=1e-5)
    assert torch.allclose(out.log_prob[8], stages[8])
    given = bits_per_dim(stages[32], 3 * 32 * 32, 5).mean()
    assert torch.allclose(out.extra["bpd_32_given_16"], given)
    # The base's figure is exact, the cascade's above it a bound.
    assert out.exact == {8: True, 16: False, 32: False}
    assert module.model_name == "Glow8-SRF16-SRF32"


# --- sampling ------------------------------------------------------------------------------
def test_sampling_is_sequential_with_a_temperature_per_stage():
    cascade = tiny_cascade()
    torch.manual_seed(0)
    samples = cascade.sample(2, None, [0.0, 0.5, 1.0])
    assert {r: tuple(x.shape) for r, x in samples.items()} == {8: (2, 3, 8, 8), 16: (2, 3, 16, 16),
                                                               32: (2, 3, 32, 32)}
    for x in samples.values():
        assert torch.equal(snap_to_bins(x, 5), x)  # on the data grid
    # The 16px stage saw the base's sample: re-sampling it from that condition with the
    # same noise reproduces it.
    torch.manual_seed(1)
    again = cascade.stage(16).sample(2, {LOWRES: samples[8]}, 0.5)
    torch.manual_seed(1)
    assert torch.equal(snap_to_bins(again, 5), snap_to_bins(cascade.stage(16).sample(2, {LOWRES: samples[8]}, 0.5), 5))
    # Temperature 0 at the base: both samples are the prior mode.
    assert torch.equal(samples[8][0], samples[8][1])
    with pytest.raises(ValueError, match="one per stage"):
        cascade.sample(2, None, [0.5, 0.5])


# --- variational training --------------------------------------------------------------------
def test_variational_condition_with_zero_sigma_is_the_clean_condition():
    cascade = tiny_cascade()
    _, clean, _ = pyramid_batch()
    result = cascade.variational_condition(32, {LOWRES: clean}, sigma=0.0)
    assert result.failure_rate == 0
    assert torch.equal(result.images, clean[16])


def test_huge_sigma_replaces_and_counts_failed_reconstructions(tmp_path):
    module = cascade_module(sr_stages=[sr_stage(sigma=1e6)], train_stages=[16])
    data = pyramid_data(top=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.train()
    prepared = module.prepare_batch(batch)
    out = module.compute_losses(prepared)
    assert out.extra["replacement_rate_16"] == 1.0
    assert torch.isfinite(out.loss)
    # Every condition fell back to the clean image: the loss equals the clean one.
    module.stage_settings[16].sigma = 0.0
    clean = module.compute_losses(prepared)
    assert torch.allclose(out.loss, clean.loss)


def test_variational_stage_trains_against_a_frozen_previous_stage(tmp_path):
    module = cascade_module(train_stages=[16], sr_stages=[sr_stage(sigma=0.3)], failure_probe_every_n_steps=1)
    before_base = {k: v.clone() for k, v in module.model.base.state_dict().items()}
    before_sr = {k: v.clone() for k, v in module.model.stage(16).state_dict().items()}
    modes = []

    class RecordMode(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            modes.append((pl_module.model.base.training, pl_module.model.stage(16).training))

    run = trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=2,
                  callbacks=[RecordMode()])
    run.fit(module, pyramid_data(top=16))
    assert modes == [(False, True)] * 3  # frozen stage in eval mode, even after validation
    after_base = module.model.base.state_dict()
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base), "frozen base moved"
    assert not module.model.base.training
    after_sr = module.model.stage(16).state_dict()
    assert any(not torch.equal(before_sr[k], after_sr[k]) for k in before_sr)
    logged = run.callback_metrics
    assert "train/replacement_rate_16" in logged
    assert "train/failure_rate_16_sigma0.5" in logged
    assert [g["name"] for g in run.optimizers[0].param_groups] == ["SRF16(0.30)"]


def test_rrdb_freeze_schedule_takes_effect_at_the_configured_step(tmp_path):
    module = cascade_module(sr_stages=[sr_stage(freeze_encoder_steps=2)])
    encoder = module.model.stage(16).encoder
    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in encoder.parameters()])

    initial = [p.detach().clone() for p in encoder.parameters()]
    trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[Snapshot()]).fit(module, pyramid_data(top=16))
    unchanged = [all(torch.equal(a, b) for a, b in zip(initial, snap)) for snap in snapshots]
    assert unchanged == [True, True, False, False]


def test_each_stage_has_its_seed_optimizer_settings():
    module = cascade_module(base=GlowStage(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8)),
                         sr_stages=[SRFlowStage(flow=SRFlow(image_size=16, **TINY_SR_FLOW))])
    groups = {g.name: g.settings for g in module.optimizer_groups()}
    assert groups["Glow8"].lr == 5e-4 and groups["Glow8"].betas == (0.9, 0.999)
    assert groups["Glow8"].weight_decay == 5e-5 and groups["Glow8"].warmup_epochs == 5.0
    assert groups["SRF16"].lr == 2.5e-4 and groups["SRF16"].betas == (0.9, 0.99)
    assert groups["SRF16"].weight_decay == 0.0
    assert groups["SRF16"].lr_milestones == [100_000, 150_000, 180_000, 190_000]
    factor = lr_factor(groups["SRF16"], lambda: 1)
    assert [factor(s) for s in (99_999, 100_000, 150_000, 180_000, 190_000)] == \
        [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert module.stage_settings[16].freeze_encoder_steps == 100_000


def test_a_stage_without_a_flow_gets_the_seed_srflow_at_twice_the_resolution():
    module = CascadeModule(base=GlowStage(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                                                    num_classes=3)),
                           sr_stages=[SRFlowStage(sigma=0.5)], n_bits=5)
    stage = module.model.stage(16)
    assert isinstance(stage, SRFlow) and stage.num_classes == 3
    assert len(stage.flow.scales) == 4 and len(stage.flow.scales[0]) == 1 + 16 and len(stage.encoder.trunk) == 23
    assert module.model_name == "GlowCC8-SRFCC16(0.50)"


# --- naming, checkpoints, class conditioning ---------------------------------------------------
def test_models_are_named_as_in_the_seed_tables():
    module = cascade_module(sr_stages=[sr_stage(sigma=0.02), sr_stage(32, sigma=0.5)])
    assert module.model_name == "Glow8-SRF16(0.02)-SRF32(0.50)"
    assert cascade_module(num_classes=10).model_name == "GlowCC8-SRFCC16"
    with pytest.raises(ValueError, match="num_classes"):
        cascade_module(sr_stages=[sr_stage(num_classes=10)])


def test_stages_load_from_checkpoints_and_mismatches_are_explained(tmp_path):
    source = cascade_module()
    perturb_parameters(source, 0.05)
    path = tmp_path / "cascade.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = cascade_module(base=glow_stage(checkpoint=str(path)), train_stages=[16],
                         sr_stages=[sr_stage(checkpoint=str(path))])
    for key, value in source.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert not any(p.requires_grad for p in loaded.model.base.parameters())
    # A staged run: every stage comes from the previous phase's checkpoint.
    staged = cascade_module(init_checkpoint=str(path), train_stages=[16])
    for key, value in source.model.state_dict().items():
        assert torch.equal(value, staged.model.state_dict()[key]), key
    with pytest.raises(ValueError, match="not stages of this cascade"):
        cascade_module(train_stages=[64])
    with pytest.raises(ValueError, match="does not match the configured architecture"):
        cascade_module(base=glow_stage(hidden_channels=16, checkpoint=str(path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cascade_module(base=glow_stage(checkpoint=str(tmp_path / "missing.ckpt")))


def test_class_conditional_cascade_uses_labels_at_every_stage():
    module = cascade_module(num_classes=4)
    module.eval()
    images = {8: torch.rand(4, 3, 8, 8) - 0.5, 16: torch.rand(4, 3, 16, 16) - 0.5}
    perturb_parameters(module, 0.05)
    with torch.no_grad():
        a = {r: module.model.encode_stage(r, images, {LABELS: torch.tensor([0, 1, 2, 3])}).log_prob for r in (8, 16)}
        b = {r: module.model.encode_stage(r, images, {LABELS: torch.tensor([3, 2, 1, 0])}).log_prob for r in (8, 16)}
    assert not torch.allclose(a[8], b[8]) and not torch.allclose(a[16], b[16])
    samples = module.sample_images(4, 0.8)
    assert set(samples) == {8, 16}


def test_rrdb_pretraining_checkpoint_feeds_an_srflow_stage(tmp_path):
    from lightning_modules import RRDBPretrainModule

    pretrain = RRDBPretrainModule(resolution=16, rrdb_features=8, rrdb_blocks=2, rrdb_growth=4, n_bits=5,
                                  optimizer=OptimizerSettings(algorithm="adam", lr=1e-3, weight_decay=0.0,
                                                              warmup_epochs=0.0))
    initial = {k: v.clone() for k, v in pretrain.encoder.state_dict().items()}
    run = trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=3)
    run.fit(pretrain, pyramid_data(top=16))
    assert any(not torch.equal(initial[k], v) for k, v in pretrain.encoder.state_dict().items())
    assert isinstance(run.optimizers[0], torch.optim.Adam)
    assert "val/psnr_16" in run.callback_metrics
    path = tmp_path / "rrdb.ckpt"
    run.save_checkpoint(path)
    module = cascade_module(sr_stages=[sr_stage(encoder_checkpoint=str(path))])
    for key, value in pretrain.encoder.state_dict().items():
        assert torch.equal(value, module.model.stage(16).encoder.state_dict()[key])
    with pytest.raises(ValueError, match="does not match"):
        cascade_module(sr_stages=[sr_stage(flow={**TINY_SR_FLOW, "rrdb_features": 16}, encoder_checkpoint=str(path))])


def test_an_sr_stage_takes_every_glow_option_from_yaml(tmp_path):
    """SRFlow is an RRDB encoder plus a Glow: options SRFlow does not list itself reach
    its flow from YAML (here the spline coupling, its bins, and the actnorm coupling net
    that is the Glow configs' default), and a stage without them is built as before."""
    from flows.layers.spline import SplineCoupling
    from lightning_modules.cli import build_cli
    from tests.conftest import REPO

    text = "".join(line for line in (REPO / "experiments" / "quick_cascade.yaml").read_text()
                   .splitlines(keepends=True) if not line.startswith("ckpt_path:"))
    (tmp_path / "cascade.yaml").write_text(text)
    stage = '''{"sigma": 0.0, "freeze_encoder_steps": 0, "flow": {"class_path": "flows.SRFlow", "init_args": {
        "image_size": 16, "scales": 2, "steps_per_scale": 1, "hidden_channels": 8, "rrdb_features": 4,
        "rrdb_blocks": 1, "rrdb_growth": 2, "coupling": "spline", "num_bins": 5,
        "coupling_net": {"class_path": "flows.nets.CouplingNet", "init_args": {"actnorm": true}}}}}'''
    module = build_cli(["--config", str(tmp_path / "cascade.yaml"), "--trainer.logger", "false",
                        "--model.init_args.sr_stages", f"[{stage}]", "--data.init_args.resolutions", "[16, 8]"],
                       run=False).model
    flow = module.model.stage(16).flow
    couplings = [m for m in flow.modules() if isinstance(m, SplineCoupling)]
    assert couplings and all(c.num_bins == 5 for c in couplings)
    nets = [m for m in flow.modules() if type(m).__name__ == "CouplingNet"]
    assert nets and all(net.actnorm for net in nets)
