"""The seed 003 configs (the diffusion-augmented flow thesis) agree where its tables compare
models: the rows of one table are trained on the same data and scored with the same FID,
the two U-Nets of a table are the same network, and the written-out choices stay written
out. YAML only (no parser, no models): fast. That the configs parse is
tests/test_cli.py::test_every_experiment_config_parses."""
import pytest
import yaml

from tests.conftest import REPO

CELEBA_TABLE_5_3 = ["diffusion_flow_celeba64", "nsf_celeba64", "pixel_ddpm_celeba64"]
MNIST_TABLE_5_4 = ["diffusion_flow_mnist", "nsf_mnist", "pixel_ddpm_mnist"]
DIFFUSION_FLOWS = ["diffusion_flow_mnist", "diffusion_flow_cifar10", "diffusion_flow_celeba64"]
SEED_003 = sorted(set(CELEBA_TABLE_5_3 + MNIST_TABLE_5_4 + DIFFUSION_FLOWS))
# Each dataset's Diffused-Flows config and its pixel DDPM baseline (Tables 5.3 / 5.4).
UNET_PAIRS = [("diffusion_flow_celeba64", "pixel_ddpm_celeba64"), ("diffusion_flow_mnist", "pixel_ddpm_mnist")]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())


def callback(config: dict, class_name: str) -> dict | None:
    """The init_args of the trainer callback whose class is ``class_name`` (None: absent);
    a bare class path counts as no init_args."""
    for entry in config["trainer"].get("callbacks", []):
        path = entry if isinstance(entry, str) else entry["class_path"]
        if path.rsplit(".", 1)[-1] == class_name:
            return {} if isinstance(entry, str) else entry.get("init_args", {})
    return None


def fid(config: dict) -> dict:
    test_metrics = callback(config, "TestMetrics")
    assert test_metrics is not None and test_metrics.get("fid"), "no FID settings"
    return test_metrics["fid"]


def data(config: dict) -> dict:
    return config["data"]["init_args"]


def model(config: dict) -> dict:
    return config["model"]["init_args"]


def denoiser(config: dict) -> dict:
    """The U-Net's settings: the DDPM prior's (Diffused-Flows) or the pixel DDPM's."""
    args = model(config)
    diffusion = (args["flow"]["init_args"]["joint_prior"]["init_args"] if "flow" in args
                 else args["model"]["init_args"])
    return diffusion["denoiser"]["init_args"]


def test_the_three_celeba_rows_of_table_5_3_see_the_same_images_and_fid():
    configs = {name: load(name) for name in CELEBA_TABLE_5_3}
    data_keys = ("class_path", "image_size", "resolutions", "crop", "landmark_crop_size", "horizontal_flip")
    seen = {name: repr([config["data"].get(k) if k == "class_path" else data(config).get(k) for k in data_keys])
            for name, config in configs.items()}
    assert len(set(seen.values())) == 1, seen
    assert all(data(c)["horizontal_flip"] is True and data(c)["crop"] == "landmark" for c in configs.values())
    fid_keys = ("feature_extractor", "feature_layer", "num_samples", "temperature")
    scored = {name: tuple(str(fid(c).get(k)) for k in fid_keys) for name, c in configs.items()}
    assert len(set(scored.values())) == 1, scored
    # seed 003 sec. 5.2.1: FID-192 for every Inception FID it reports
    assert str(fid(configs["nsf_celeba64"])["feature_layer"]) == "192"


def test_the_three_mnist_rows_of_table_5_4_score_fid_on_the_mnist_classifier():
    configs = {name: load(name) for name in MNIST_TABLE_5_4}
    for name, config in configs.items():
        assert fid(config).get("feature_extractor") == "mnist-lenet", name  # seed 003 sec. 5.2.1
    scored = {name: (fid(c)["feature_weights"], fid(c)["num_samples"], fid(c)["temperature"])
              for name, c in configs.items()}
    assert len(set(scored.values())) == 1, scored
    assert {data(c).get("horizontal_flip") for c in configs.values()} == {False}


@pytest.mark.parametrize("name", SEED_003)
def test_every_seed_003_config_times_25_samples_and_its_inception_fids_are_fid_192(name):
    config = load(name)
    assert callback(config, "TestMetrics")["sampling_time_samples"] == 25  # Tables 5.3/5.4
    settings = fid(config)
    if settings.get("feature_extractor", "inception-v3-compat").startswith("inception"):
        assert str(settings.get("feature_layer")) == "192", "seed 003 reports FID-192 (sec. 5.2.1)"


@pytest.mark.parametrize("name", DIFFUSION_FLOWS)
def test_every_diffusion_flow_config_writes_gaussian_residual_out(name):
    prior = model(load(name))["flow"]["init_args"]["joint_prior"]
    assert prior["class_path"].endswith("DiffusionPrior")
    assert prior["init_args"].get("gaussian_residual") is True  # not left to the default


@pytest.mark.parametrize("flow_name, ddpm_name", UNET_PAIRS)
def test_a_tables_two_unets_are_the_same_network(flow_name, ddpm_name):
    unet_keys = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "dropout")
    flow_unet, ddpm_unet = denoiser(load(flow_name)), denoiser(load(ddpm_name))
    assert {k: flow_unet.get(k) for k in unet_keys} == {k: ddpm_unet.get(k) for k in unet_keys}


@pytest.mark.parametrize("name", DIFFUSION_FLOWS + ["pixel_ddpm_mnist", "pixel_ddpm_celeba64"])
def test_unet_dropout_is_ddpms_cifar10_value_only_at_32x32(name):
    # Ho et al. 2020 App. B: 0.1 on CIFAR-10, 0 on the other data sets; MNIST follows CIFAR-10.
    expected = 0.0 if name.endswith("celeba64") else 0.1
    assert denoiser(load(name))["dropout"] == expected


@pytest.mark.parametrize("name", DIFFUSION_FLOWS)
def test_the_diffusion_flows_ddpm_trains_as_the_pixel_ddpm_and_its_flow_as_nsf(name):
    args, ddpm, nsf = model(load(name)), model(load("pixel_ddpm_mnist")), model(load("nsf_mnist"))
    diffusion_group = args["diffusion_optimizer"]
    assert (diffusion_group["lr"], diffusion_group.get("warmup_steps")) == \
        (ddpm["optimizer"]["lr"], ddpm["optimizer"]["warmup_steps"]) == (2.0e-4, 5000)
    assert args["grad_clip_norm"] == ddpm["grad_clip_norm"] == 1.0
    assert "warmup_steps" not in args["flow_optimizer"]
    assert args["flow_optimizer"]["warmup_epochs"] == nsf["optimizer"]["warmup_epochs"]


@pytest.mark.parametrize("name", DIFFUSION_FLOWS)
def test_early_stopping_and_annealing_of_sec_4_3_scale_with_the_epoch_budget(name):
    config = load(name)
    epochs = config["trainer"]["max_epochs"]
    stopping = callback(config, "EarlyStopping")
    assert stopping is not None, "seed 003 sec. 4.3 names early stopping"
    image_size = model(config)["flow"]["init_args"]["image_size"]
    assert stopping["monitor"] == callback(config, "ModelCheckpoint")["monitor"] == f"val/nll_bpd_{image_size}"
    assert stopping["mode"] == "min"
    assert stopping["patience"] == round(0.1 * epochs)
    args = model(config)
    decays = {args[group]["epoch_decay"] for group in ("flow_optimizer", "diffusion_optimizer")}
    assert len(decays) == 1
    assert 0.09 <= decays.pop() ** epochs <= 0.11  # down to ~1/10 at the last epoch


@pytest.mark.parametrize("name", ["nsf_mnist", "nsf_celeba64", "pixel_ddpm_mnist", "pixel_ddpm_celeba64"])
def test_the_baselines_keep_their_references_schedule(name):
    # Their headers say why: sec. 4.3 is about the seed's own model; DDPM keeps a constant
    # rate, NSF's cosine annealing is not an OptimizerSettings schedule.
    config = load(name)
    assert callback(config, "EarlyStopping") is None
    optimizer = model(config)["optimizer"]
    assert optimizer.get("epoch_decay", 1.0) == 1.0 and not optimizer.get("lr_milestones")


@pytest.mark.parametrize("name", ["nsf_mnist", "nsf_celeba64"])
def test_nsf_writes_its_relative_clipping_out(name):
    assert model(load(name)).get("grad_clip_relative") == 2.0
