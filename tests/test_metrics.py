"""FID / KID through torch-fidelity and the metrics table of `lightning test`."""
import json
import urllib.error

import pytest
import torch

from flows import Glow
from flows.quantization import dequantize, reduce_bits, to_uint8
from lightning_modules import FIDSettings, GlowModule, TestMetrics, ValidationFID
from lightning_modules.metrics import INCEPTION_FILE, TensorImages, fidelity
from tests.conftest import perturb_parameters, recording_logger
from tests.builders import SMOKE_FID as SMOKE, cascade_module, pyramid_data, sr_stage
from tests.conftest import trainer



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
    module = cascade_module(sr_stages=[sr_stage(sigma=0.05)])
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(evaluation)])
    run.test(module, pyramid_data(top=16))
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
    run.test(module, pyramid_data(top=8))
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
    module = cascade_module()
    run = trainer(tmp_path, max_epochs=2, limit_val_batches=2, num_sanity_val_steps=1, callbacks=[fid])
    data = pyramid_data(top=16)
    run.fit(module, data)
    assert {"val/fid_8", "val/fid_16"} <= set(run.callback_metrics)
    assert all(torch.isfinite(run.callback_metrics[k]) for k in ("val/fid_8", "val/fid_16"))
    # The validation images, gathered once (not again in epoch 2, nor in the sanity check).
    assert int(fid.metrics[16].real_features_num_samples) == len(data.datasets["val"])
    assert not any("fid" in key or "inception" in key for key in module.state_dict())


# --- seed 003's evaluation: FID-192, MNIST-classifier features, sampling time ------------------

def digit_like(n=200, seed=0, channels=3):
    """Synthetic 32x32 uint8 'digits': class k is a bright bar at its own place and
    angle, with noise. Returns (images [n, channels, 32, 32], labels [n])."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.rand(n, 1, 32, 32, generator=generator) * 40
    for i, k in enumerate(labels.tolist()):
        row, column = 4 + 12 * (k // 5), 3 + 6 * (k % 5)
        if k % 2:
            images[i, 0, row:row + 10, column:column + 3] += 200
        else:
            images[i, 0, row + 3:row + 6, column:column + 8] += 200
    images = images.clamp(0, 255).to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous(), labels


def lenet_file(tmp_path, seed=0):
    from lightning_modules.mnist_classifier import LeNetFeatures

    torch.manual_seed(seed)
    net = LeNetFeatures()
    perturb_parameters(net, 0.1)  # features of a useful scale (PyTorch's init shrinks them layer by layer)
    path = tmp_path / "lenet.pt"
    torch.save(net.state_dict(), path)
    return path


def test_mnist_lenet_features_give_zero_fid_for_identical_sets_and_see_a_change(tmp_path):
    from lightning_modules.metrics import in_loop_fid

    weights = lenet_file(tmp_path)
    # The weights file under either name: inception_weights (the old one) or feature_weights.
    old_name, new_name = (FIDSettings(feature_extractor="mnist-lenet", batch_size=64, kid_subset_size=32,
                                      **{key: str(weights)}) for key in ("inception_weights", "feature_weights"))
    real, _ = digit_like(128)
    same = fidelity(TensorImages(real), TensorImages(real.clone()), old_name, None, cuda=False)
    assert abs(same["fid"]) < 1e-3
    inverted = fidelity(TensorImages(255 - real), TensorImages(real), new_name, None, cuda=False)["fid"]
    noisy = (real.float() + torch.randn(real.shape, generator=torch.Generator().manual_seed(1)) * 60)
    noised = fidelity(TensorImages(noisy.clamp(0, 255).to(torch.uint8)), TensorImages(real), old_name, None,
                      cuda=False)["fid"]
    assert inverted > 1.0 and noised > 1.0
    # The in-loop (torchmetrics) FID on the same features gives the same number.
    metric = in_loop_fid(new_name)
    metric.update(real, real=True)
    metric.update(255 - real, real=False)
    assert float(metric.compute()) == pytest.approx(inverted, rel=1e-3)


def test_lenet_features_read_grey_rgb_and_28_pixel_images_alike(tmp_path):
    from lightning_modules.mnist_classifier import load_lenet_features

    net = load_lenet_features(lenet_file(tmp_path))
    grey, _ = digit_like(8, channels=1)
    reference = net(grey)
    assert reference.shape == (8, net.num_features)
    assert torch.allclose(net(grey.expand(-1, 3, -1, -1)), reference)
    assert torch.allclose(net(grey.float() / 255 - 0.5), reference, atol=1e-5)
    assert torch.allclose(net(grey[..., 2:30, 2:30].contiguous()), net(torch.nn.functional.pad(
        grey[..., 2:30, 2:30], (2, 2, 2, 2))), atol=1e-5)


def test_missing_classifier_weights_name_the_config(tmp_path):
    from lightning_modules.metrics import in_loop_fid

    images = TensorImages(digit_like(16)[0])
    for settings in (FIDSettings(feature_extractor="mnist-lenet", feature_weights=str(tmp_path / "none.pt"),
                                 batch_size=8, kid_subset_size=8),
                     FIDSettings(feature_extractor="mnist-lenet", batch_size=8, kid_subset_size=8)):
        with pytest.raises(FileNotFoundError, match="experiments/mnist_classifier.yaml"):
            fidelity(images, images, settings, None, cuda=False)
        with pytest.raises(FileNotFoundError, match="experiments/mnist_classifier.yaml"):
            in_loop_fid(settings)
    with pytest.raises(FileNotFoundError, match="none.pt"):
        in_loop_fid(FIDSettings(feature_extractor="mnist-lenet", feature_weights=str(tmp_path / "none.pt")))


def test_fid_192_reaches_torch_fidelity_and_torchmetrics(monkeypatch, tmp_path):
    import torch_fidelity
    import torchmetrics.image.fid

    from lightning_modules.metrics import in_loop_fid

    calls = []

    def fake_metrics(**kwargs):
        calls.append(kwargs)
        return {"frechet_inception_distance": 1.0, "kernel_inception_distance_mean": 0.1,
                "kernel_inception_distance_std": 0.01}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake_metrics)
    images = TensorImages(real_images(8))
    fidelity(images, images, FIDSettings(feature_layer="192", batch_size=8), None, cuda=False)
    fidelity(images, images, FIDSettings(batch_size=8), None, cuda=False)
    assert calls[0]["feature_layer_fid"] == "192" and calls[0]["feature_layer_kid"] == "192"
    assert "feature_layer_fid" not in calls[1] and "feature_layer_kid" not in calls[1]
    assert FIDSettings(feature_layer=192).feature_layer == "192"  # YAML's `feature_layer: 192`

    built = []
    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", lambda **kwargs: built.append(kwargs))
    in_loop_fid(FIDSettings(feature_layer="192"))
    in_loop_fid(FIDSettings())
    assert [kwargs["feature"] for kwargs in built] == [192, 2048]


def test_real_statistics_cache_name_holds_the_feature_layer(monkeypatch, tmp_path):
    import lightning_modules.evaluation as evaluation

    names = []

    def fake_fidelity(fake, real, settings, real_cache_name, cuda):
        names.append(real_cache_name)
        return {"fid": 1.0, "kid": 0.1, "kid_std": 0.01}

    monkeypatch.setattr(evaluation, "fidelity", fake_fidelity)
    module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5)
    for layer in ("192", "2048", None):
        settings = FIDSettings(num_samples=4, batch_size=4, feature_layer=layer)
        run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(settings, sampling_time_samples=None)])
        run.test(module, pyramid_data(top=8))
    assert len(names) == 3
    assert names[0] != names[1] and "192" in names[0] and "2048" in names[1]
    assert names[2] == names[1]  # None is Inception's default, 2048


def test_time_sampling_times_the_calls_after_one_warm_up():
    import time

    from lightning_modules.metrics import time_sampling

    calls = []

    def sampler(n):
        calls.append(n)
        time.sleep(0.5 if len(calls) == 1 else 0.02)  # a slow first call (compilation, caches)

    seconds = time_sampling(sampler, 25, torch.device("cpu"), repeats=3)
    assert calls == [25, 25, 25, 25]
    assert 0.02 <= seconds < 0.5


def test_lightning_test_writes_the_sampling_time(tmp_path):
    module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5)
    sample = module.sample_images
    calls = []
    module.sample_images = lambda n, temperature: calls.append((n, temperature)) or sample(n, temperature)
    recorder = recording_logger(tmp_path)
    run = trainer(tmp_path, limit_test_batches=1, logger=recorder, callbacks=[TestMetrics(sampling_time_samples=5)])
    run.test(module, pyramid_data(top=8))
    # The run folder of a logger: <save_dir>/<name>/<version> (run_folder.log_dir).
    table = json.loads((tmp_path / "recorder" / "version_0" / "metrics.json").read_text())
    assert table["sampling_time_samples"] == 5 and table["sampling_time_s"] > 0
    assert calls == [(5, 1.0), (5, 1.0)]  # a warm-up and the timed call
    assert recorder.logged["test/sampling_time_s"] == table["sampling_time_s"]
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(sampling_time_samples=None)])
    run.test(module, pyramid_data(top=8))
    assert "sampling_time_s" not in json.loads((tmp_path / "metrics.json").read_text())


def test_mnist_classifier_learns_and_exports_its_feature_net(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    from lightning_modules import LeNetFeatures, MNISTClassifierModule
    from lightning_modules.mnist_classifier import load_lenet_features

    images, labels = digit_like(200, channels=1)

    class Batches(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return {"images": {32: images[index]}, "label": labels[index]}

    module = MNISTClassifierModule(export_path=str(tmp_path / "out" / "lenet.pt"), lr=3e-3)
    with torch.no_grad():
        before = (module.net.logits(images).argmax(1) == labels).float().mean()
    loader = DataLoader(Batches(), batch_size=20, shuffle=True)
    run = trainer(tmp_path, max_steps=30, limit_val_batches=1)
    run.fit(module, loader, DataLoader(Batches(), batch_size=50))
    module.eval()
    with torch.no_grad():
        accuracy = (module.net.logits(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.8 and accuracy > before + 0.3  # chance: 0.1
    assert float(run.callback_metrics["val/acc"]) > 0.5
    exported = load_lenet_features(tmp_path / "out" / "lenet.pt")
    assert isinstance(exported, LeNetFeatures)
    assert torch.equal(exported(images), module.net(images))
