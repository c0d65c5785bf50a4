"""Permuted Fashion-MNIST: the Permuted MNIST protocol on Fashion-MNIST.

Fashion-MNIST is read from /usr/share/datasets/fashion-mnist (`apt-get install
dataset-fashion-mnist`), $SPECTRAL_PLASTICITY_DATA/fashion_mnist, or `stream.data_dir`.
"""

from spectral_plasticity.experiment import load_config


def get_config(scale: str = "small"):
    config = load_config("permuted_mnist", scale)
    config.stream.name = "permuted_fashion_mnist"
    return config
