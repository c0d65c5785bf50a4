"""Permuted Fashion-MNIST: the Permuted MNIST protocol on Fashion-MNIST.

Fashion-MNIST is read from /usr/share/datasets/fashion-mnist (`apt-get install
dataset-fashion-mnist`), $SPECTRAL_PLASTICITY_DATA/fashion_mnist, or `stream.data_dir`.
"""

import permuted_mnist


def get_config(scale: str = "small"):
    config = permuted_mnist.get_config(scale)
    config.stream.name = "permuted_fashion_mnist"
    return config
