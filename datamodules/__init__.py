"""LightningDataModules yielding image pyramids, and the transforms they use."""
from datamodules.datamodules import (CelebADataModule, CIFAR10DataModule, DigitsDataModule,
                                     EmbeddedDataModule, ImageFolderDataModule, MNISTDataModule,
                                     PyramidDataModule)
from datamodules.pyramid import ImagePyramid
from datamodules.sources import DatasetNotFoundError

__all__ = ["CelebADataModule", "CIFAR10DataModule", "DigitsDataModule", "EmbeddedDataModule",
           "ImageFolderDataModule", "MNISTDataModule", "PyramidDataModule", "ImagePyramid",
           "DatasetNotFoundError"]
