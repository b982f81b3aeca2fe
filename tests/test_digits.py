"""The quick start's data: scikit-learn's 8x8 digits as an embedded, labelled source."""
import pytest
import torch

from datamodules import DigitsDataModule
from datamodules.sources import DigitImages, digits_split_indices, load_digit_images


def test_digit_images_are_the_source_scaled_to_8_bits():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images()
    source = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == source.target.tolist()
    expected = (torch.from_numpy(source.images).double() * 255 / 16).round().to(torch.uint8)
    assert torch.equal(images[:, 0], expected)  # 0 -> 0, 16 -> 255
    assert images.min() == 0 and images.max() == 255


def test_splits_are_disjoint_stratified_deterministic_and_cover_every_image():
    images, labels = load_digit_images()
    splits = digits_split_indices(labels, 18, 18, seed=0)
    sets = {name: set(split) for name, split in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert set.union(*sets.values()) == set(range(1797))
    assert [len(splits[n]) for n in ("train", "val", "test")] == [1437, 180, 180]
    for name in ("val", "test"):  # every digit held out 18 times
        assert torch.bincount(labels[splits[name]], minlength=10).tolist() == [18] * 10
    # no image content is shared between splits (the source holds no duplicates)
    rows = {name: {bytes(images[i].flatten().tolist()) for i in split} for name, split in splits.items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    # the same seed gives the same splits whatever the global RNG; another seed others
    torch.manual_seed(123)
    assert digits_split_indices(labels, 18, 18, seed=0) == splits
    assert digits_split_indices(labels, 18, 18, seed=1)["val"] != splits["val"]


def test_data_module_yields_16px_one_channel_labelled_batches():
    dm = DigitsDataModule(batch_size=32)
    assert dm.num_classes == 10 and dm.channels == 1
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.datasets[n]) for n in ("train", "val", "test")] == [1437, 180, 180]
    batch = next(iter(dm.train_dataloader()))
    images = batch["images"][16]
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and 0 <= batch["label"].min() and batch["label"].max() <= 9
    test = next(iter(dm.test_dataloader()))
    assert test["images"][16].shape[1:] == (1, 16, 16)
    # each item is its source digit (bicubic upsample) with its own label
    source = DigitImages("test")
    images8, labels = load_digit_images()
    row = int(source.index_in_source[5])
    image, label = source[5]
    assert label == int(labels[row])
    assert (torch.nn.functional.avg_pool2d(image.float()[None], 2)[0] - images8[row].float()).abs().mean() < 20
    # deterministic: a second module serves the same validation images
    again = DigitsDataModule()
    again.setup("fit")
    assert torch.equal(again.datasets["val"].source.images, dm.datasets["val"].source.images)


def test_holding_out_too_many_is_a_clear_error():
    from datamodules.sources import DataSettingsError

    with pytest.raises(DataSettingsError, match="leaves none to train on"):
        DigitImages("train", val_per_class=100, test_per_class=100)
