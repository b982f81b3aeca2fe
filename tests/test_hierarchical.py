"""The hierarchical conditional flow of seed 001: exact inversion, per-flow log-dets,
the stop-gradient, the ELBO as a true bound, eq. 11's sigma, the entropy of q, the
sampling temperatures, bad settings, and its module's parameter groups."""
import math

import pytest
import torch

from flows.base import FEATURES
from flows.hierarchical import (HierarchicalFlow, Level, gaussian_entropy, level_flow, minibatch_sigma,
                                validate_levels)
from lightning_modules import HierarchicalModule
from tests.builders import tiny_levels
from tests.conftest import perturb_parameters


def tiny_model(n=8, **kwargs) -> tuple[HierarchicalFlow, torch.Tensor]:
    torch.manual_seed(0)
    model = HierarchicalFlow(levels=tiny_levels(), skip_channels=3, **kwargs)
    x = torch.rand(n, 3, 8, 8) - 0.5
    model.train()
    with torch.no_grad():
        model.encode(x)  # ActNorm initialization and the running sigma
    perturb_parameters(model, 0.05)
    return model.eval(), x


def test_decode_of_encode_is_exact_given_the_encoded_latents():
    model, x = tiny_model()
    with torch.no_grad():
        encoding = model.encode(x)
        back = model.decode(encoding.latents)
    assert (back - x).abs().max() < 1e-5
    # Each y, too: the flows invert exactly given their conditions (eq. 8-9).
    assert encoding.exact is False and model.exact is False


@pytest.mark.parametrize("index", range(4))
def test_each_level_flow_log_det_is_the_brute_force_jacobian(index):
    model, x = tiny_model()
    model = model.double()
    flow = model.flows[index]
    level = model.levels[index]
    y = torch.randn(2, level.channels, level.resolution, level.resolution, dtype=torch.float64)
    cond = None
    if level.cond_channels:
        cond = {FEATURES: torch.randn(2, level.cond_channels, level.resolution, level.resolution,
                                      dtype=torch.float64)}
    _, logdet = flow(y, cond)
    for i in range(2):
        ci = None if cond is None else {FEATURES: cond[FEATURES][i:i + 1]}

        def forward(v, i=i, ci=ci):
            return flow(v.reshape(1, *y.shape[1:]), ci)[0].flatten()

        jacobian = torch.autograd.functional.jacobian(forward, y[i].flatten())
        assert torch.allclose(logdet[i], torch.linalg.slogdet(jacobian).logabsdet, atol=1e-8)


def test_level_flows_keep_resolution_and_round_trip():
    level = tiny_levels()[1]
    flow = level_flow(level).eval()
    perturb_parameters(flow, 0.1)
    y = torch.randn(3, 4, 4, 4)
    cond = {FEATURES: torch.randn(3, 4, 4, 4)}
    with torch.no_grad():
        z, logdet = flow(y, cond)
        back, inverse_logdet = flow.inverse(z, cond)
    assert z.shape == y.shape  # no squeeze, no split (sec. 2.2)
    assert (back - y).abs().max() < 1e-5
    assert torch.allclose(logdet + inverse_logdet, torch.zeros(3), atol=1e-4)


def encoder_gradients(model: HierarchicalFlow, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad for p in model.encoders.parameters() if p.grad is not None and p.grad.abs().sum() > 0]


def test_the_prior_flow_sends_no_gradient_into_the_encoders():
    model, x = tiny_model()
    model.train()
    encoding = model.encode(x)
    # eq. 5: L_prior(SG[y]): the prior flow's loss leaves every encoder weight alone...
    assert encoder_gradients(model, -encoding.level_log_probs[-1].sum()) == []
    # ...which it would not without the stop-gradient: the same loss on the encoder's y.
    y_prior = model.encode_means(x)[-1]
    z, logdet = model.flows[-1](y_prior)
    assert len(encoder_gradients(model, -(logdet - 0.5 * (z ** 2).flatten(1).sum(1)).sum())) > 0
    # The encoders still learn, through the conditions of the finer flows.
    encoding = model.encode(x)
    assert len(encoder_gradients(model, -encoding.level_log_probs[0].sum())) > 0


def test_stop_gradient_prior_only_lets_the_finer_flows_shape_their_y():
    def head_gradient(stop_gradient):
        model, x = tiny_model(stop_gradient=stop_gradient)
        model.train()
        model.zero_grad(set_to_none=True)
        # y_4's flow loss; encoders[0].head makes y_4 (its trunk also feeds the coarser
        # encoders, whose y's condition this flow, so only the head tells the paths apart).
        (-model.encode(x).level_log_probs[1].sum()).backward()
        return sum(p.grad.abs().sum() for p in model.encoders[0].head.parameters() if p.grad is not None)

    assert head_gradient("prior") > 0  # eq. 5 as printed: only the prior's input is detached
    assert head_gradient("all") == 0  # the official code: every flow's input is


def test_minibatch_sigma_is_eq_11_by_hand():
    torch.manual_seed(1)
    mu = torch.randn(10, 2, 3, 3) * torch.linspace(0.5, 2.0, 18).view(1, 2, 3, 3)
    sigma = minibatch_sigma(mu, var_batch_size=4)
    # Sub-batches [0:4], [4:8], [8:10]; per element the unbiased std over the sub-batch,
    # then the mean over the 18 dimensions: one scalar per sub-batch.
    expected = []
    for start, end in ((0, 4), (4, 8), (8, 10)):
        values = mu[start:end].reshape(end - start, 18)
        mean = values.sum(0) / (end - start)
        std = (((values - mean) ** 2).sum(0) / (end - start - 1)).sqrt()
        expected += [std.sum() / 18] * (end - start)
    assert torch.allclose(sigma, torch.stack(expected), atol=1e-6)
    # A trailing single image joins the sub-batch before it.
    assert torch.allclose(minibatch_sigma(mu[:9], 4)[4:], minibatch_sigma(mu[4:9], 5))


def test_entropy_is_the_closed_form_of_the_gaussian_q():
    std = torch.tensor([0.05, 0.4, 2.0])
    closed = torch.distributions.Normal(torch.zeros(3), std).entropy() * 17
    assert torch.allclose(gaussian_entropy(17, std), closed, atol=1e-5)
    model, x = tiny_model()
    with torch.no_grad():
        encodings = [model.encode(x) for _ in range(100)]
    expected = sum(gaussian_entropy(level.channels * level.resolution ** 2, level.alpha_flow * model.running_sigma[i])
                   for i, level in enumerate(model.levels[1:]))
    assert torch.allclose(encodings[0].entropy, expected.expand(x.shape[0]), atol=1e-4)
    # and the Monte Carlo -E[log q(y|x)] of the drawn y's agrees with it
    # (72 dimensions: -log q has std 6 per draw, 0.21 over these 800 draws).
    monte_carlo = -torch.stack([e.log_posterior for e in encodings]).mean()
    assert abs(monte_carlo - encodings[0].entropy[0]) < 0.7


def test_the_elbo_is_below_importance_weighted_bounds_that_grow_with_k():
    model, x = tiny_model(n=16)
    torch.manual_seed(2)
    with torch.no_grad():
        elbo = torch.stack([model.encode(x).log_prob for _ in range(64)]).mean(0)
        bounds = {k: torch.stack([model.importance_weighted_log_prob(x, k) for _ in range(max(1, 64 // k))]).mean(0)
                  for k in (1, 8, 64)}
    means = {k: v.mean().item() for k, v in bounds.items()}
    # K = 1 is the ELBO in expectation (same draws' distribution, estimated apart)
    assert abs(means[1] - elbo.mean().item()) < 0.05 * abs(elbo.mean().item())
    assert elbo.mean() <= means[8] <= means[64]
    assert means[64] - means[1] > 0.5  # nats: a visible gap for this q


def test_sampling_temperatures_follow_fig_4():
    model, _ = tiny_model()
    assert model.temperatures(0.7) == [0.7, 0.7, 1.0, 1.0]  # resolution-1 levels at 1.0
    assert HierarchicalFlow(levels=tiny_levels(), top_temperature=None).temperatures(0.7) == [0.7] * 4
    assert model.temperatures([0.1, 0.2, 0.3, 0.4]) == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="one per level"):
        model.temperatures([0.7, 1.0])
    torch.manual_seed(0)
    a = model.sample(2, None, [0.0, 0.0, 0.0, 0.0])
    b = model.sample(2, None, [0.0, 0.0, 0.0, 0.0])
    assert torch.equal(a, b)


def test_evaluation_uses_the_running_sigma_not_the_batch():
    model, x = tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        alone = model.encode(x[:1]).entropy
        together = model.encode(x).entropy[:1]
    assert torch.allclose(alone, together)


@pytest.mark.parametrize("changes, key", [
    ({1: dict(resolution=3)}, r"levels\[1\]\.resolution"),
    ({1: dict(couplings=["C", "S4"])}, r"levels\[1\]\.couplings.*4x4 checkerboard S4"),
    ({2: dict(alpha_flow=-0.1)}, r"levels\[2\]\.alpha"),
    ({1: dict(couplings=["X"])}, r"levels\[1\]\.couplings.*'X'"),
    ({3: dict(cond_channels=2)}, r"levels\[3\]\.cond_channels"),
])
def test_bad_levels_are_clear_errors_naming_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        validate_levels(tiny_levels(changes), 8, 3)


def test_module_has_the_three_parameter_groups_of_table_2():
    model, _ = tiny_model()
    module = HierarchicalModule(flow=model)
    groups = {g.name: g for g in module.optimizer_groups()}
    assert set(groups) == {"encoders", "decoders", "flows"}
    assert {n: g.settings.lr for n, g in groups.items()} == {"encoders": 5e-4, "decoders": 2e-3, "flows": 5e-3}
    assert {n: g.settings.epoch_decay for n, g in groups.items()} == {"encoders": 0.92, "decoders": 0.95,
                                                                      "flows": 0.95}
    total = sum(p.numel() for g in groups.values() for p in g.params)
    assert total == sum(p.numel() for p in model.parameters())  # every parameter in one group
    freeze = module.parts()[0].freezes[0]
    assert not freeze.frozen(step=10_000, epoch=59) and freeze.frozen(step=10_000, epoch=60)


def test_the_loss_is_the_weighted_sum_and_the_elbo_is_logged_as_a_bound():
    model, x = tiny_model()
    weights = [0.5, 2.0, 0.25, 4.0]
    for level, w in zip(model.levels, weights):
        level.loss_weight = w
    module = HierarchicalModule(flow=model).eval()
    from lightning_modules.base import Batch
    # noise 1/2: the model's dequantizer leaves x (taken as the bin centres) as it is.
    batch = Batch({8: x}, {8: x}, torch.zeros(x.shape[0], dtype=torch.long), {8: torch.full_like(x, 0.5)})
    torch.manual_seed(5)
    out = module.compute_losses(batch)
    torch.manual_seed(5)
    encoding = model.encode(x)
    expected = sum(w * -lp / math.log(2) for w, lp in zip(weights, encoding.level_log_probs)).mean()
    assert torch.allclose(out.loss, expected)
    assert out.exact == {8: False} and module.bound_metric == "elbo_bpd"
    assert torch.allclose(out.log_prob[8], encoding.log_prob)


def test_print_config_shows_table_4_and_table_2(capsys):
    from tests.commands import print_config
    result = print_config(capsys, "--config", "experiments/hierarchical_celebahq256.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for line in ("class_path: flows.HierarchicalFlow", "var_batch_size: 4", "resolution: 256", "channels: 508",
                 "alpha_decoder: 0.075", "alpha_flow: 0.4", "coupling_hidden: 128", "cond_channels: 128",
                 "encoder_hidden: 512", "decoder_hidden: 512", "invconv: unitary", "- S8", "lr: 0.005",
                 "epoch_decay: 0.92", "freeze_encoders_at_epoch: 60", "grad_clip_norm: 50.0",
                 "horizontal_flip: true", "num_samples: 30000", "decay: 0.995"):
        assert line in out, line


def test_config_a_has_the_latent_size_of_table_4():
    import yaml

    from tests.conftest import REPO
    config = yaml.safe_load((REPO / "experiments/hierarchical_celebahq256.yaml").read_text())
    levels = [Level(**level) for level in config["model"]["init_args"]["flow"]["init_args"]["levels"]]
    assert sum(level.channels * level.resolution ** 2 for level in levels) == 271_360  # |y|, Table 4
    assert [level.resolution for level in levels] == [256, 128, 32, 8, 1, 1]
    assert [len(level.couplings) for level in levels] == [4, 8, 8, 8, 8, 8]  # flow lengths K


def test_per_epoch_decay_multiplies_the_rate_once_per_epoch():
    from lightning_modules.parts import OptimizerSettings, lr_factor
    factor = lr_factor(OptimizerSettings(warmup_epochs=0, epoch_decay=0.9), lambda: 10)
    assert [round(factor(s), 6) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.9, 0.81]


def test_horizontal_flips_mirror_every_resolution_alike_and_only_in_training():
    from types import SimpleNamespace

    from datamodules import EmbeddedDataModule
    data = EmbeddedDataModule(image_size=8, resolutions=[8, 4], horizontal_flip=True)
    images = {8: torch.arange(64 * 6, dtype=torch.float32).view(6, 1, 8, 8),
              4: torch.arange(16 * 6, dtype=torch.float32).view(6, 1, 4, 4)}
    data.trainer = SimpleNamespace(training=False)
    batch = data.on_after_batch_transfer({"images": dict(images)}, 0)
    assert all(torch.equal(batch["images"][r], images[r]) for r in images)
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    batch = data.on_after_batch_transfer({"images": dict(images)}, 0)
    flipped = [not torch.equal(batch["images"][8][i], images[8][i]) for i in range(6)]
    assert any(flipped) and not all(flipped)
    for i, was_flipped in enumerate(flipped):
        for r in images:
            expected = images[r][i].flip(-1) if was_flipped else images[r][i]
            assert torch.equal(batch["images"][r][i], expected)


# --- the official code's switches (issue 22) -------------------------------------------------
def config_a():
    import yaml

    from tests.conftest import REPO
    return yaml.safe_load((REPO / "experiments/hierarchical_celebahq256.yaml").read_text())


def official_multiplicative_lr(decay: float, start: int | None, epochs: int) -> list[float]:
    """The official schedule re-implemented: a MultiplicativeLR stepped once per epoch
    whose factor at step x is ``decay`` when ``x % 2 == 0 and x != 0 and x > start``
    (hflow/utils.py, one GPU) or without the start condition (model.py, DDP); returns the
    rate's factor during each epoch."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    rule = (lambda x: decay if x % 2 == 0 and x != 0 and x > start else 1.0) if start is not None \
        else (lambda x: decay if x % 2 == 0 and x != 0 else 1.0)
    scheduler = torch.optim.lr_scheduler.MultiplicativeLR(optimizer, rule)
    factors = []
    for _ in range(epochs):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("every, after, start", [(2, 10, 10), (2, 0, None)])
def test_epoch_decay_every_second_epoch_matches_the_official_schedule(every, after, start):
    from lightning_modules.parts import OptimizerSettings, lr_factor
    steps = 7  # optimizer steps per epoch
    official = official_multiplicative_lr(0.95, start, 200)
    factor = lr_factor(OptimizerSettings(warmup_epochs=0, epoch_decay=0.95, epoch_decay_every=every,
                                         epoch_decay_after=after), lambda: steps)
    for epoch in (10, 11, 59, 199):
        for step in (epoch * steps, epoch * steps + steps - 1):  # constant through the epoch
            assert factor(step) == pytest.approx(official[epoch], rel=1e-9), (epoch, step)
    if start == 10:  # the figures: 1 through epoch 11, 0.29 at 59, 8e-3 at 199
        assert [round(official[e], 4) for e in (10, 11, 59, 199)] == [1.0, 1.0, 0.2920, 0.0081]
    # the defaults keep the per-epoch decay of older configs
    old = lr_factor(OptimizerSettings(warmup_epochs=0, epoch_decay=0.95), lambda: steps)
    assert old(59 * steps) == pytest.approx(0.95 ** 59)


def test_config_a_follows_the_official_code_where_it_is_the_better_source():
    config = config_a()
    init = config["model"]["init_args"]
    for group in ("encoder_optimizer", "decoder_optimizer", "flow_optimizer"):
        assert (init[group]["epoch_decay_every"], init[group]["epoch_decay_after"]) == (2, 10)
    assert init["accumulate_grad_batches"] * config["data"]["init_args"]["batch_size"] == 16
    assert config["trainer"]["devices"] == 1
    fid = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TestMetrics"))
    assert fid["init_args"]["fid"]["temperature"] == 0.8  # the official FID_GEN_STD
    assert (fid["init_args"]["fid"]["reference_split"], fid["init_args"]["fid"]["reference_max_images"]) == \
        ("train", 30000)
    # the alphas per level, read from the built model (the official measured ones)
    model = HierarchicalFlow(**init["flow"]["init_args"])
    alphas = {(level.resolution, i): (level.alpha_flow, level.alpha_decoder) for i, level in enumerate(model.levels)}
    assert alphas == {(256, 0): (0.0, 0.0), (128, 1): (0.4, 0.4), (32, 2): (0.4, 0.4), (8, 3): (0.05, 0.05),
                      (1, 4): (0.05, 0.075), (1, 5): (0.05, 0.075)}
    assert [round(1 / level.loss_weight, 1) for level in model.levels[-2:]] == [508.0, 4.0]
    # equalized-learning-rate convs everywhere but the decoders' U-Nets, at the code's multipliers
    from flows.nets import EqualizedConv2d
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert {m.lr_multiplier for m in model.encoders.modules() if isinstance(m, EqualizedConv2d)} == {10.0}
    assert {m.lr_multiplier for m in model.flows.modules() if isinstance(m, EqualizedConv2d)} == {1.0}
    # the parameter count is unchanged by the switches: 78.29 M (official trainable 77.38 M)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 78.29


def first_adam_step_relative_changes(equalized: bool) -> dict[str, float]:
    """Median over conv weight tensors (those not starting at zero) of |dW| / |W| after
    one Adam step at Table 2's rates, per parameter group; the decoders' U-Nets apart."""
    from flows.nets import EqualizedConv2d, ZeroConv2d
    torch.manual_seed(0)
    # An image at 16 so that the image's decoder starts at 8x8 with a U-Net (Fig. 12).
    levels = [Level(resolution=16, channels=3, couplings=["C", "S2"], coupling_hidden=16, cond_channels=4,
                    decoder_hidden=16),
              Level(resolution=8, channels=4, couplings=["C", "S2"], coupling_hidden=16, cond_channels=4,
                    alpha_flow=0.4, alpha_decoder=0.4, conditioning_unet=True, encoder_hidden=16,
                    decoder_hidden=16),
              *tiny_levels()[2:]]
    model = HierarchicalFlow(levels=levels, skip_channels=3, equalized_lr=equalized)
    module = HierarchicalModule(flow=model, train_noise_std=0.0).train()
    groups = module.optimizer_groups()
    optimizer = torch.optim.Adam([{"params": g.params, "lr": g.settings.lr} for g in groups])
    x = torch.rand(8, 3, 16, 16) - 0.5
    with torch.no_grad():
        model.encode(x)  # ActNorm initialization
        # The zero-started output convs pass no gradient back at the very first step (so the
        # decoders and encoders would not move at all); start them small instead.
        for m in model.modules():
            if isinstance(m, ZeroConv2d):
                m.conv.weight.normal_(0.0, 1e-2)
    kinds = (torch.nn.Conv2d, EqualizedConv2d)
    tensors = {"encoders": [], "decoders": [], "decoders_unet": [], "flows": []}
    for part in ("encoders", "decoders", "flows"):
        for name, m in getattr(model, part).named_modules():
            if isinstance(m, kinds) and m.weight.abs().sum() > 0:
                unet = part == "decoders" and ".unet." in f".{name}."
                tensors[part + ("_unet" if unet else "")].append(m.weight)
    before = {id(w): w.detach().clone() for ws in tensors.values() for w in ws}
    from lightning_modules.base import Batch
    loss = module.compute_losses(Batch({16: x}, {16: x}, torch.zeros(8, dtype=torch.long),
                                       {16: torch.full_like(x, 0.5)})).loss
    loss.backward()
    optimizer.step()
    return {kind: torch.tensor([((w.detach() - before[id(w)]).norm() / before[id(w)].norm()).item()
                                for w in ws]).median().item()
            for kind, ws in tensors.items() if ws}


def test_equalized_lr_makes_the_first_adam_step_the_official_size():
    # The official MyConv stores N(0, 1) / m and an Adam first step moves every stored entry
    # by lr (m / sqrt(v) = sign(g)): |dW| / |W| = lr * m. m = 10 for the encoders' and
    # decoders' convs, 1 for the flows' and the decoders' U-Nets (hflow/network.py).
    official = {"encoders": 5e-4 * 10, "decoders": 2e-3 * 10, "decoders_unet": 2e-3 * 1, "flows": 5e-3 * 1}
    measured = first_adam_step_relative_changes(equalized=True)
    assert set(measured) == set(official)
    for kind, value in measured.items():
        assert official[kind] / 2 <= value <= official[kind] * 2, (kind, value, official[kind])
    # PyTorch's init: the flows' steps are 20x the official (at Config A's widths 40x)
    plain = first_adam_step_relative_changes(equalized=False)
    assert plain["flows"] > 4 * official["flows"]


def test_equalized_lr_keeps_the_state_dict_keys_and_exact_inversion():
    torch.manual_seed(0)
    plain = HierarchicalFlow(levels=tiny_levels(), skip_channels=3)
    equalized = HierarchicalFlow(levels=tiny_levels(), skip_channels=3, equalized_lr=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in equalized.state_dict().items()}
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        equalized.train().encode(x)
        perturb_parameters(equalized, 0.05)
        encoding = equalized.eval().encode(x)
        assert (equalized.decode(encoding.latents) - x).abs().max() < 1e-5


def test_identity_actnorm_at_1x1_survives_an_init_batch_of_two():
    def after_init(identity: bool):
        torch.manual_seed(3)
        model = HierarchicalFlow(levels=tiny_levels(), skip_channels=3, actnorm_identity_at_1x1=identity)
        x = torch.rand(2, 3, 8, 8) - 0.5
        with torch.no_grad():
            model.train().encode(x)  # the first batch initializes the ActNorms: 2 images
            scales = [m.log_scale for flow, level in zip(model.flows, model.levels) if level.resolution == 1
                      for m in flow.modules() if isinstance(m, ActNorm)]
            encoding = model.eval().encode(torch.rand(6, 3, 8, 8) - 0.5)
        return scales, encoding

    from flows.layers import ActNorm
    scales, encoding = after_init(identity=True)
    assert scales and all(torch.equal(s, torch.zeros_like(s)) for s in scales)  # the identity
    assert torch.isfinite(encoding.log_prob).all()
    assert max(z.abs().max().item() for z in encoding.latents[-2:]) < 100.0
    bpd = -encoding.log_prob / (3 * 64 * math.log(2.0))
    assert (bpd < 100).all()
    data_scales, _ = after_init(identity=False)  # from the data: two numbers per channel
    assert any(s.abs().max() > 0 for s in data_scales)


def test_config_b_checkpoint_follows_val_loss_with_config_a_callbacks(capsys):
    import yaml

    from tests.commands import print_config
    result = print_config(capsys, "--config", "experiments/hierarchical_celebahq256.yaml",
                          "--config", "experiments/overrides/hierarchical_config_b.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    callbacks = yaml.safe_load(result.stdout)["trainer"]["callbacks"]
    checkpoints = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert [c["init_args"]["monitor"] for c in checkpoints] == ["val/loss"]
    # the override repeats Config A's callbacks (a YAML list replaces the list): only the monitor differs
    from tests.conftest import REPO
    override = yaml.safe_load((REPO / "experiments/overrides/hierarchical_config_b.yaml").read_text())
    expected = config_a()["trainer"]["callbacks"]
    for entry in expected:
        if entry["class_path"].endswith("ModelCheckpoint"):
            entry["init_args"]["monitor"] = "val/loss"
    assert override["trainer"]["callbacks"] == expected


def test_fid_reference_defaults_to_the_training_images_with_a_cap():
    from datamodules import EmbeddedDataModule
    from lightning_modules import FIDSettings, TestMetrics
    from lightning_modules.errors import ConfigurationError
    data = EmbeddedDataModule(image_size=8, train_size=40, val_size=6)
    data.setup("test")  # `lightning test` sets up the test split only
    assert set(data.datasets) == {"test"}
    from lightning_modules.family import FamilyInterface

    # Stand-ins that implement the callbacks' contract with its defaults, the split apart.
    hierarchical = type("Hierarchical", (FamilyInterface,),
                        {"fid_reference_split": HierarchicalModule.fid_reference_split})()
    split, reference = TestMetrics(FIDSettings(reference_max_images=30)).reference(data, hierarchical)
    assert (split, len(reference)) == ("train", 30)  # the training images, capped
    split, reference = TestMetrics(FIDSettings()).reference(data, hierarchical)
    assert (split, len(reference)) == ("train", 40)
    assert reference[0]["images"][8].dtype == torch.uint8
    # other families keep the test split (seed 000 sec. 4.2); a named split wins
    assert TestMetrics(FIDSettings()).reference(data, FamilyInterface())[0] == "test"
    split, reference = TestMetrics(FIDSettings(reference_split="test")).reference(data, hierarchical)
    assert (split, len(reference)) == ("test", 6)
    with pytest.raises(ConfigurationError, match="reference_max_images"):
        FIDSettings(reference_max_images=0)


def test_fid_reference_count_goes_into_metrics_json(tmp_path):
    import json

    from datamodules import EmbeddedDataModule
    from lightning_modules import FIDSettings, TestMetrics
    from tests.conftest import trainer
    model, _ = tiny_model()
    module = HierarchicalModule(flow=model)
    settings = FIDSettings(feature_extractor="random-conv", batch_size=16, kid_subset_size=8, num_samples=16,
                           reference_max_images=24, cache_dir=str(tmp_path / "cache"))
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(settings, sampling_time_samples=None)])
    run.test(module, datamodule=EmbeddedDataModule(image_size=8, train_size=40, val_size=8, batch_size=8))
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert table["fid_reference_split"] == "train" and table["fid_reference_images"] == {"8": 24}
    assert math.isfinite(table["fid"]["8"])


def accumulated_run(tmp_path, batch_size: int, accumulate: int, initial: HierarchicalFlow) -> list[torch.Tensor]:
    """The gradients of the first optimizer step (as clipped and stepped) of a fit with
    micro-batches of ``batch_size`` accumulated ``accumulate`` times."""
    import copy

    from datamodules import EmbeddedDataModule
    from lightning_modules.base import FlowModule
    from tests.conftest import trainer
    model = copy.deepcopy(initial)
    module = HierarchicalModule(flow=model, train_noise_std=0.0, accumulate_grad_batches=accumulate)
    # No random numbers in the step: clean (bin-centre) images, deterministic encoders.
    module.prepare_batch = lambda batch, noise=True: FlowModule.prepare_batch(module, batch, noise=False)
    gradients = []
    clip = module.on_before_optimizer_step

    def record(optimizer):
        clip(optimizer)
        gradients.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters())

    module.on_before_optimizer_step = record
    data = EmbeddedDataModule(image_size=8, train_size=32, val_size=8, batch_size=batch_size)
    run = trainer(tmp_path / f"b{batch_size}k{accumulate}", max_steps=1, limit_val_batches=0)
    run.fit(module, datamodule=data)
    assert run.global_step == 1 and len(gradients) == len(list(model.parameters()))  # one optimizer step
    return gradients


def test_accumulating_four_micro_batches_of_four_is_one_step_on_sixteen(tmp_path):
    torch.manual_seed(0)
    initial = HierarchicalFlow(levels=tiny_levels(), skip_channels=3, noise_multiplier=0.0)
    with torch.no_grad():
        initial.train().encode(torch.rand(16, 3, 8, 8) - 0.5)  # ActNorm initialized beforehand, alike
        perturb_parameters(initial, 0.05)  # every layer passes gradients (no zero-started outputs)
    big = accumulated_run(tmp_path, 16, 1, initial)
    accumulated = accumulated_run(tmp_path, 4, 4, initial)
    single = accumulated_run(tmp_path, 4, 1, initial)

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, a.abs().max().item()))

    assert sum(g.abs().sum() > 0 for g in big) > len(big) // 2
    assert all(close(a, b) for a, b in zip(big, accumulated))
    assert not all(close(a, b) for a, b in zip(big, single))  # one micro-batch alone is another step


def test_schedules_count_optimizer_steps_when_accumulating():
    from types import SimpleNamespace

    from lightning_modules.parts import steps_per_epoch
    data = SimpleNamespace(train_dataloader=lambda: range(10))
    for accumulate, expected in ((1, 10), (4, 3), (16, 1)):
        run = SimpleNamespace(datamodule=data, world_size=1,
                              lightning_module=SimpleNamespace(accumulate_grad_batches=accumulate))
        assert steps_per_epoch(run) == expected
