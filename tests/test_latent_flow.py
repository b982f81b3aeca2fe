"""The latent flow (lightning_modules/latent_module.py, STARFlow's latent modelling) on a
tiny random diffusers AutoencoderKL built from a config (no weights file downloaded),
and the project's own autoencoder training (lightning_modules/autoencoder_module.py)."""
import functools
import math

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("diffusers")

from flows.dequantization import GaussianNoiseDequantizer, UniformDequantizer  # noqa: E402
from flows.tarflow import TarFlow  # noqa: E402
from lightning_modules import AutoencoderModule, LatentFlowModule  # noqa: E402
from lightning_modules.errors import ConfigurationError  # noqa: E402
from lightning_modules.family import Batch  # noqa: E402
from lightning_modules.latent_module import LATENT_METRIC, load_autoencoder  # noqa: E402
from tests.conftest import REPO, perturb_parameters, run_command  # noqa: E402

NOISE = 0.3


@pytest.fixture(scope="module")
def autoencoder_folder(tmp_path_factory):
    """A random 2-level AutoencoderKL (8x8 RGB -> 4x4x4 latents), saved as diffusers does."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("autoencoder")
    autoencoder.save_pretrained(str(folder))
    return folder


def tiny_flow(dequantizer=functools.partial(GaussianNoiseDequantizer, noise_std=NOISE), **kwargs):
    torch.manual_seed(1)
    flow = TarFlow(in_channels=4, image_size=4, patch_size=1, channels=16, blocks=2, layers_per_block=[1, 2],
                   head_channels=8, dequantizer=dequantizer, **kwargs)
    perturb_parameters(flow, 0.05)
    return flow


def latent_module(folder, **kwargs):
    return LatentFlowModule(flow=tiny_flow(), autoencoder=str(folder), image_size=8, **kwargs)


def images(n=4, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=generator).float() + 0.5) / 256 - 0.5


def batch_of(x):
    return Batch(images={8: x}, clean={8: x}, labels=torch.zeros(len(x), dtype=torch.long))


def test_images_round_trip_through_the_latents_and_the_flow(autoencoder_folder):
    module = latent_module(autoencoder_folder).eval()
    x = images()
    with torch.no_grad():
        torch.manual_seed(0)
        latents = module.encode_latents(x)
        assert latents.shape == (4, 4, 4, 4)
        encoding = module.model.encode(latents)
        assert (module.model.decode(encoding.latents) - latents).abs().max() < 1e-4
        decoded = module.decode_latents(latents)
        assert decoded.shape == x.shape
        # the autoencoder's own decode of the unscaled latents, halved to model space
        expected = 0.5 * module._autoencoder.decode(latents / module.scaling_factor).sample
        assert torch.allclose(decoded, expected)
        assert module.scaling_factor == pytest.approx(0.18215)  # the config's (diffusers' default)
        samples = module.sample_images(3, 1.0)[8]
    assert samples.shape == (3, 3, 8, 8) and torch.isfinite(samples).all()


def test_the_latent_likelihood_is_the_flows_exact_density_of_noisy_latents_and_named_so(autoencoder_folder):
    module = latent_module(autoencoder_folder).eval()
    x = images()
    torch.manual_seed(7)
    out = module.compute_losses(batch_of(x))
    assert out.exact[8] is True and out.continuous == {8}
    # by hand, from the same draws: the posterior sample, then the latent noise
    torch.manual_seed(7)
    latents = module.encode_latents(x)
    noisy = latents + NOISE * torch.randn_like(latents)
    with torch.no_grad():
        log_prob = module.model.log_prob(noisy)
    assert torch.allclose(out.log_prob[8], log_prob, atol=1e-4)
    figure = (-log_prob / (module.model.dims * math.log(2.0))).mean()
    assert out.loss.item() == pytest.approx(figure.item(), abs=1e-4)
    # logged as the latents' figure, never as the images' bits per dim
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    item = {"images": {8: ((x + 0.5) * 256).clamp(0, 255).to(torch.uint8)}, "label": torch.zeros(4, dtype=torch.long),
            "index": torch.arange(4)}
    loader = torch.utils.data.DataLoader([item], batch_size=1, collate_fn=lambda items: items[0])
    trainer.validate(module, loader, verbose=False)
    names = set(trainer.callback_metrics)
    assert f"val/{LATENT_METRIC}_8" in names and not any(name.startswith("val/bpd") for name in names)


def test_checkpoints_hold_the_flow_and_a_trained_decoder_never_the_frozen_encoder(autoencoder_folder, tmp_path):
    frozen = latent_module(autoencoder_folder)
    assert all(key.startswith("model.") or "." not in key for key in frozen.state_dict())
    finetuned = latent_module(autoencoder_folder, finetune_decoder=True)
    keys = set(finetuned.state_dict())
    assert any(key.startswith("decoder.") for key in keys) and any(key.startswith("post_quant_conv.") for key in keys)
    assert not any("encoder" in key and not key.startswith("decoder.") for key in keys)
    # every parameter belongs to a part (the optimizer sees the flow and the decoder)
    in_parts = {id(p) for part in finetuned.parts() for p in part.module.parameters()}
    assert in_parts == {id(p) for p in finetuned.parameters()}
    # a checkpoint round trip: the same flow, the same decoder, the encoder from its folder
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(finetuned)
    path = tmp_path / "latent.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(stored) == keys
    restored = LatentFlowModule.load_from_checkpoint(str(path), map_location="cpu", flow=tiny_flow())  # built in Python
    for key, value in finetuned.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.filterwarnings("ignore:flow is frozen but no checkpoint holds it")  # a decoder-only phase, by itself
def test_a_finetuned_decoder_learns_to_decode_noisy_latents(autoencoder_folder):
    module = latent_module(autoencoder_folder, finetune_decoder=True, train_flow=False)
    decoder_parameters = list(module.decoder.parameters()) + list(module.post_quant_conv.parameters())
    assert [part.name for part in module.parts() if part.trainable] == ["decoder", "decoder.post_quant_conv"]
    optimizer = torch.optim.Adam(decoder_parameters, lr=3e-3)
    x = images(8)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        out = module.compute_losses(batch_of(x))
        optimizer.zero_grad()
        out.extra["decoder_mse"].backward()
        optimizer.step()
        losses.append(out.extra["decoder_mse"].item())
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])  # random images: only their average is learnable
    assert module.model.blocks[0].proj_in.weight.grad is None  # the flow is frozen in this phase


def test_bad_settings_are_one_clear_error(autoencoder_folder, tmp_path):
    with pytest.raises(ConfigurationError, match=r"model\.init_args\.autoencoder: .*nowhere.* is not a diffusers"):
        latent_module(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match="GaussianNoiseDequantizer"):
        LatentFlowModule(flow=tiny_flow(dequantizer=UniformDequantizer), autoencoder=str(autoencoder_folder),
                         image_size=8)
    with pytest.raises(ConfigurationError, match=r"latents of shape \[4, 8, 8\]"):
        LatentFlowModule(flow=tiny_flow(), autoencoder=str(autoencoder_folder), image_size=16)
    assert load_autoencoder(str(autoencoder_folder)).training is False


def test_the_projects_autoencoder_learns_and_exports_a_folder_the_latent_flow_reads(tmp_path):
    torch.manual_seed(0)
    export = tmp_path / "autoencoder"
    module = AutoencoderModule(export_dir=str(export), block_out_channels=[8, 16], norm_num_groups=4, kl_weight=1e-4,
                               lr=3e-3)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    x[:, :, :4] = 20  # structure to learn: a dark top half
    batch = {"images": {8: x}, "label": torch.zeros(16, dtype=torch.long)}
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(40):
        module.log = lambda *args, **kwargs: None
        loss = module._step(batch, "train")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    module._latent_std = []
    with torch.no_grad():
        module._step(batch, "val")
    std = module._latent_std[0].item()
    module.export()
    loaded = load_autoencoder(str(export))
    assert loaded.config.scaling_factor == pytest.approx(1.0 / std, rel=1e-5)
    with torch.no_grad():
        latents = loaded.encode(x.float() / 127.5 - 1).latent_dist.mean * loaded.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0  # scaled latents of about unit spread


@pytest.mark.slow
def test_the_quick_autoencoder_and_latent_flow_configs_run_end_to_end(tmp_path, capsys):
    common = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
              "--data.init_args.train_size", "128", "--data.init_args.val_size", "64"]
    folder = tmp_path / "autoencoder"
    code, err, _ = run_command(capsys, "fit", "--config", str(REPO / "experiments/quick_autoencoder.yaml"), *common,
                               "--trainer.default_root_dir", str(tmp_path / "ae"),
                               "--trainer.logger.init_args.save_dir", str(tmp_path / "ae"),
                               "--model.init_args.export_dir", str(folder))
    assert code == 0, err[-2000:]
    assert (folder / "config.json").is_file()
    code, err, _ = run_command(capsys, "fit", "--config", str(REPO / "experiments/quick_latent_flow.yaml"), *common,
                               "--trainer.default_root_dir", str(tmp_path / "flow"),
                               "--trainer.logger.init_args.save_dir", str(tmp_path / "flow"),
                               "--model.init_args.autoencoder", str(folder))
    assert code == 0, err[-2000:]
    checkpoints = list((tmp_path / "flow").rglob("*latent_nll_bits*.ckpt"))
    assert checkpoints, list((tmp_path / "flow").rglob("*"))
