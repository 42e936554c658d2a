"""The paper's architectures as builders with stable module names."""

from biasshift.models.conv import (
    SpatialPyramidPool,
    cifar_conv11,
    cifar_conv18,
    imagenet_conv15,
)
from biasshift.models.mlp import autoencoder, count_parameters, he_init_, mlp, paper_mlp
from biasshift.models.stacked import StackedSequential

__all__ = [
    "SpatialPyramidPool",
    "StackedSequential",
    "autoencoder",
    "cifar_conv11",
    "cifar_conv18",
    "count_parameters",
    "he_init_",
    "imagenet_conv15",
    "mlp",
    "paper_mlp",
]
