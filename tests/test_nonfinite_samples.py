"""Silent faults of sample evaluation: non-finite samples are counted, left out of FID/KID and
painted red everywhere (one marking); every JSON is strict; smoke-test features say so."""
import json
import math

import pytest
import torch

from flows import Glow
from lightning_modules import (FIDSettings, GlowModule, LatentInterpolation, NoiseSweep, ResamplingMaps, SampleGrids,
                               TestMetrics, ValidationFID)
from lightning_modules.sample_grids import FAILED_LEGEND, draw_samples, mark_failed
from lightning_modules.metrics import TensorImages, as_rgb, fidelity, json_text
from tests.builders import SMOKE_FID as SMOKE, pyramid_data, split_grid, tiny_glow
from tests.conftest import recording_logger
from tests.conftest import trainer

SMOKE_NOTE = "[random-conv features: smoke test, not comparable with published FIDs]"


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity (Python's json accepts them; JSON does not)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def failing_at(temperature: float, n: int) -> list[int]:
    """Which samples of a sample_images(n, temperature) call fail: none at T <= 0.5, every
    fourth at T = 1, all above."""
    if temperature <= 0.5:
        return []
    return list(range(0, n, 4)) if temperature <= 1.0 else list(range(n))


def glow_with_failures(image_size=8):
    """A tiny GlowModule whose samples at the indices of ``failing_at`` have one NaN (even
    ones) or +inf (odd ones) value: mostly finite images that to_uint8 shows as fine."""
    module = GlowModule(flow=Glow(image_size=image_size, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5)
    sample = module.sample_images

    def sample_images(n, temperature):
        x = sample(n, temperature)[image_size].clone()
        bad = failing_at(temperature, n)
        x[bad[0::2], 0, 1, 1] = float("nan")
        x[bad[1::2], 2, 3, 0] = float("inf")
        return {image_size: x}

    module.sample_images = sample_images
    return module


def is_red(tile: torch.Tensor) -> bool:
    return bool((tile[0] == 255).all() and (tile[1:] == 0).all())


def test_json_text_is_strict_and_mark_failed_paints_red():
    text = json_text({"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": torch.tensor(float("nan")),
                      "d": {"e": 2}})
    assert strict_loads(text) == {"a": None, "b": [1.5, None, None], "c": None, "d": {"e": 2}}
    grey = torch.full((3, 1, 2, 2), 77, dtype=torch.uint8)
    shown = mark_failed(grey, torch.tensor([False, True, False]))
    assert shown.shape == (3, 3, 2, 2) and shown.dtype == torch.uint8
    assert is_red(shown[1]) and (shown[[0, 2]] == 77).all()
    assert (grey == 77).all()  # the input is left alone


def test_metrics_json_counts_nonfinite_samples_and_scores_only_the_finite_ones(tmp_path, monkeypatch, capsys):
    import lightning_modules.evaluation as evaluation

    scored, titles = [], []
    real_fidelity, real_plot = evaluation.fidelity, evaluation.plot_temperature_sweep

    def recording_fidelity(fake, real, settings, cache_name, cuda):
        scored.append((fake, real))
        return real_fidelity(fake, real, settings, cache_name, cuda)

    def recording_plot(path, sweep, title, *args):
        titles.append(title)
        return real_plot(path, sweep, title, *args)

    monkeypatch.setattr(evaluation, "fidelity", recording_fidelity)
    monkeypatch.setattr(evaluation, "plot_temperature_sweep", recording_plot)
    settings = FIDSettings(**SMOKE, num_samples=16, temperature=1.0, sweep_temperatures=[0.5, 2.0],
                           cache_dir=str(tmp_path / "cache"))
    module = glow_with_failures()
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(settings, sampling_time_samples=None)])
    run.test(module, pyramid_data(top=8))
    printed = capsys.readouterr().out
    text = (tmp_path / "metrics.json").read_text()
    table = strict_loads(text)

    assert table["nonfinite_samples"] == {"8": {"count": 4, "of": 16}}
    assert table["temperature_sweep_nonfinite_samples"] == {"0.5": {"8": {"count": 0, "of": 16}},
                                                            "2": {"8": {"count": 16, "of": 16}}}
    # The FID is that of the 12 finite samples alone, against the same real images.
    fake, real = scored[0]
    assert len(fake) == 12
    finite = draw_samples(module, 16, 1.0, settings.seed, settings.batch_size).finite_images(8)
    assert torch.equal(torch.stack([fake[i] for i in range(len(fake))]), finite)
    assert table["fid"]["8"] == pytest.approx(fidelity(TensorImages(finite), real, settings, None, cuda=False)["fid"],
                                              rel=1e-6)
    # All samples non-finite at T = 2: no FID, null in the JSON, never NaN.
    assert table["temperature_sweep"]["2"] == {"8": None} and table["temperature_sweep"]["0.5"]["8"] > 0
    assert strict_loads((tmp_path / "temperature_sweep.json").read_text())["2"] == {"8": None}
    # Which features, flagged as a smoke test: in the table, the printed lines and the plot.
    assert table["fid_features"] == "random-conv" and table["fid_is_smoke_test"] is True
    assert "smoke test" in table["fid_features_note"]
    line = next(line for line in printed.splitlines() if "at 8px, temperature 1.0: FID" in line)
    assert SMOKE_NOTE in line and "4 of 16 samples non-finite" in line
    assert any("FID and KID not computed: 16 of 16 samples non-finite" in line and SMOKE_NOTE in line
               for line in printed.splitlines())
    assert titles == ["Glow8: FID (random-conv smoke-test features) vs temperature"]


def test_a_fid_of_no_finite_samples_is_null_and_said_so(tmp_path, capsys):
    settings = FIDSettings(**SMOKE, num_samples=8, temperature=2.0, cache_dir=str(tmp_path / "cache"))
    run = trainer(tmp_path, limit_test_batches=1, callbacks=[TestMetrics(settings, sampling_time_samples=None)])
    run.test(glow_with_failures(), pyramid_data(top=8))
    table = strict_loads((tmp_path / "metrics.json").read_text())
    assert table["fid"] == {"8": None} and table["kid"] == {"8": None}
    assert table["nonfinite_samples"] == {"8": {"count": 8, "of": 8}}
    assert "8 of 8 samples non-finite" in table["fid_not_computed"]["8"]
    assert "FID and KID not computed" in capsys.readouterr().out
    # An Inception evaluation is not flagged (only named).
    assert not FIDSettings().is_smoke_test


def test_validation_fid_and_sample_grids_count_exclude_and_mark_nonfinite_samples(tmp_path):
    module = glow_with_failures()
    fid = ValidationFID(FIDSettings(**SMOKE, temperature=1.0), num_samples=16)
    grids = SampleGrids(temperatures=[0.5, 1.0], num_samples=16)
    recorder = recording_logger(tmp_path)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=recorder,
                  callbacks=[fid, grids])
    run.fit(module, pyramid_data(top=8))

    metrics = run.callback_metrics
    assert float(metrics["val/nonfinite_samples_8"]) == 4
    # The in-loop FID is that of the 12 finite samples (the real statistics are kept across resets).
    finite = draw_samples(module, 16, 1.0, fid.fid.seed, fid.fid.batch_size).finite_images(8)
    assert finite.shape[0] == 12
    metric = fid.metrics[8]
    metric.reset()
    metric.update(torch.stack([as_rgb(x) for x in finite]), real=False)
    assert float(metrics["val/fid_8"]) == pytest.approx(float(metric.compute()), rel=1e-4)
    assert float(metrics["val/fid_8_random-conv_smoke_test"]) == float(metrics["val/fid_8"])

    # The grids: failed samples are red tiles, counted in the loggers.
    assert recorder.logged["val/nonfinite_samples_8_t1"] == 4 and recorder.logged["val/nonfinite_samples_8_t0.5"] == 0
    samples_dir = tmp_path / "recorder" / "version_0" / "samples"
    (failing,) = samples_dir.glob("*_res8_t1.png")
    tiles = split_grid(failing, 4, 4)
    for i in range(16):
        assert is_red(tiles[i // 4][i % 4]) == (i % 4 == 0), i
    (clean,) = samples_dir.glob("*_res8_t0.5.png")
    assert not any(is_red(tile) for row in split_grid(clean, 4, 4) for tile in row)


def test_analyses_mark_failed_decodings_red_and_write_strict_json(tmp_path):
    glow, _ = tiny_glow()
    module = GlowModule(flow=glow, n_bits=5)
    decode = module.model.decode

    def broken_decode(latents, cond=None, temperature=1.0):
        x = decode(latents, cond, temperature).clone()
        x[1, 0, 2, 2] = float("nan")  # the second image of every batch fails
        return x

    module.model.decode = broken_decode
    run = trainer(tmp_path, limit_test_batches=1,
                  callbacks=[ResamplingMaps(images=2, samples=3), LatentInterpolation(pairs=2, steps=3),
                             NoiseSweep(sigmas=[0.0, 0.1], images=2)])
    run.test(module, pyramid_data(top=8))
    out = tmp_path / "analyses"

    # Resampling: the failed image's std maps are red, not a silent black row, and its JSON has no NaN.
    resampling = strict_loads((out / "resampling.json").read_text())
    keys = resampling["scales_finest_first"]
    assert resampling["nonfinite_maps"]["8"] == {k: {"count": 1, "of": 2} for k in keys}
    assert all(math.isfinite(v) for v in resampling["mean_pixel_std"]["8"].values())
    assert FAILED_LEGEND in resampling["figures"]["res8"]["title"]
    assert resampling["figures"]["res8"]["failed_tiles"] == len(keys)
    tiles = split_grid(out / "raw" / "resampling_res8.png", 2, 1 + len(keys))
    assert not any(is_red(t) for t in tiles[0]) and not is_red(tiles[1][0])
    assert all(is_red(t) for t in tiles[1][1:])

    # Interpolation: the failing pair's decodings are red; its endpoint error is null, not NaN.
    interpolation = strict_loads((out / "interpolation.json").read_text())
    assert interpolation["endpoint_max_abs_error"]["8"] is None
    assert FAILED_LEGEND in interpolation["figures"]["res8"]["title"]
    tiles = split_grid(out / "raw" / "interpolation_res8.png", 2, 3)
    assert not any(is_red(t) for t in tiles[0]) and all(is_red(t) for t in tiles[1])

    # The noise sweep uses the same marking and legend.
    sweep = strict_loads((out / "noise_sweep.json").read_text())
    assert FAILED_LEGEND in sweep["figures"]["res8"]["title"]
