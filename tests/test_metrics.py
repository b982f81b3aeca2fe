"""FID / KID through torch-fidelity and the metrics table of `lightning test`."""
import json
import urllib.error

import pytest
import torch

from flows import Glow
from flows.quantization import dequantize, reduce_bits, to_uint8
from lightning_modules import FIDSettings, GlowModule, TestMetrics, ValidationFID
from lightning_modules.metrics import INCEPTION_FILE, TensorImages, fidelity
from tests.test_cascade import sr_stage, tiny_data, tiny_module, trainer

SMOKE = dict(feature_extractor="random-conv", batch_size=32, kid_subset_size=16)


def real_images(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=generator) * 200
    ramp = torch.linspace(0, 50, 16).reshape(1, 1, 1, 16)
    return (base + ramp + torch.rand(n, 3, 16, 16, generator=generator) * 5).clamp(0, 255).to(torch.uint8)


def test_fid_is_zero_for_identical_sets_and_grows_with_the_shift(tmp_path):
    settings = FIDSettings(**SMOKE, cache_dir=str(tmp_path))
    real = real_images()
    same = fidelity(TensorImages(real), TensorImages(real.clone()), settings, None, cuda=False)
    assert abs(same["fid"]) < 1e-6
    shifted = [fidelity(TensorImages((real.float() * (1 - s)).to(torch.uint8)), TensorImages(real),
                        settings, None, cuda=False)["fid"] for s in (0.1, 0.5)]
    assert 1e-4 < shifted[0] < shifted[1]


def test_real_statistics_are_cached_under_their_name(tmp_path):
    settings = FIDSettings(**SMOKE, cache_dir=str(tmp_path))
    real = real_images()
    fake = real_images(seed=1)
    first = fidelity(TensorImages(fake), TensorImages(real), settings, "real-test-16", cuda=False)
    assert any("real-test-16" in p.name for p in tmp_path.rglob("*"))
    # A second call with other images under the same name reuses the cached statistics.
    again = fidelity(TensorImages(fake), TensorImages(real_images(seed=2)), settings, "real-test-16", cuda=False)
    assert again["fid"] == pytest.approx(first["fid"])


def test_missing_inception_weights_name_the_file(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    settings = FIDSettings(batch_size=8, kid_subset_size=8, cache_dir=str(tmp_path))
    images = TensorImages(real_images(8))
    with pytest.raises(RuntimeError, match=INCEPTION_FILE) as error:
        fidelity(images, images, settings, None, cuda=False)
    assert "inception_weights" in str(error.value)
    settings.inception_weights = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fidelity(images, images, settings, None, cuda=False)


def test_real_images_are_reduced_to_the_models_bits_like_its_samples():
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert torch.equal(reduce_bits(image, 5), to_uint8(dequantize(image, 5, noise=False), 5))
    assert torch.equal(reduce_bits(image, 8), image)


def test_lightning_test_writes_the_metrics_table_and_temperature_sweep(tmp_path):
    evaluation = FIDSettings(**SMOKE, num_samples=16, temperature=[0.8, 1.0],
                             sweep_temperatures=[0.5, 1.0], cache_dir=str(tmp_path / "cache"))
    module = tiny_module(sr_stages=[sr_stage(sigma=0.05)])
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(evaluation)])
    run.test(module, tiny_data(top=16))
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert table["model"] == "Glow8-SRF16(0.05)"
    assert set(table["bpd"]) == {"8", "16_given_8"} and set(table["bpd_bound"]) == {"16"}
    assert table["bpd_bound"]["16"] == pytest.approx(float(run.callback_metrics["test/bpd_bound_16"]))
    assert set(table["fid"]) == {"8", "16"} and set(table["kid"]) == {"8", "16"}
    assert all(v > 0 for v in table["fid"].values())
    sweep = json.loads((tmp_path / "temperature_sweep.json").read_text())
    assert set(sweep) == {"0.5", "1"} and set(sweep["0.5"]) == {"8", "16"}
    assert sweep["1"] != sweep["0.5"]
    assert (tmp_path / "temperature_sweep.png").stat().st_size > 1000


def test_glow_module_table_uses_the_seed_name(tmp_path):
    module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5)
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(FIDSettings(**SMOKE, num_samples=8))])
    run.test(module, tiny_data(top=8))
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert table["model"] == "Glow8" and set(table["fid"]) == {"8"} and set(table["bpd"]) == {"8"}


def test_in_loop_torchmetrics_fid_equals_torch_fidelity_on_the_same_features(tmp_path):
    from lightning_modules.metrics import in_loop_fid

    settings = FIDSettings(**SMOKE, cache_dir=str(tmp_path))
    real, fake = real_images(64, seed=0), real_images(64, seed=5)
    fake = (fake.float() * 0.8).to(torch.uint8)
    reference = fidelity(TensorImages(fake), TensorImages(real), settings, None, cuda=False)["fid"]
    metric = in_loop_fid(settings)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert float(metric.compute()) == pytest.approx(reference, rel=1e-3)
    # Real statistics survive a reset (they are gathered once per run).
    metric.reset()
    metric.update(fake, real=False)
    assert float(metric.compute()) == pytest.approx(reference, rel=1e-3)


def test_validation_logs_fid_curves_per_resolution(tmp_path):
    fid = ValidationFID(FIDSettings(**SMOKE, temperature=1.0), every_n_validations=1, num_samples=16)
    module = tiny_module()
    run = trainer(tmp_path, max_epochs=2, limit_val_batches=2, num_sanity_val_steps=1, callbacks=[fid])
    data = tiny_data(top=16)
    run.fit(module, data)
    assert {"val/fid_8", "val/fid_16"} <= set(run.callback_metrics)
    assert all(torch.isfinite(run.callback_metrics[k]) for k in ("val/fid_8", "val/fid_16"))
    # The validation images, gathered once (not again in epoch 2, nor in the sanity check).
    assert int(fid.metrics[16].real_features_num_samples) == len(data.datasets["val"])
    assert not any("fid" in key or "inception" in key for key in module.state_dict())
