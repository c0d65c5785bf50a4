"""Flax models of the paper's benchmarks, each returning its hidden features.

Every model's ``__call__`` returns ``(outputs, features)``: ``features`` maps the name of each
hidden layer (a top-level key of the model's ``params``) to that layer's post-activation output,
so metrics, the effective-rank regularizer and unit recycling (CBP, ReDo) need no second forward
pass. Dense features have shape ``(batch, units)``; convolutional features ``(batch, H, W,
channels)``, taken after the activation and after the pooling that follows it.

``unit_layers(model)`` lists the ``(layer, next_layer)`` pairs whose units can be recycled:
``layer``'s output units feed ``next_layer``'s input. When a convolutional layer feeds a dense one
through a flatten, the dense kernel's input axis is the channel-last flattening of
``(H, W, channels)``, so unit ``c`` owns every input row ``i`` with ``i % channels == c``.

References: Dohare et al. (2024), "Loss of plasticity in deep continual learning", Nature 632
(MLP with Kaiming-uniform init, the continual-ImageNet ConvNet, the CIFAR ResNet-18);
He et al. (2016), "Deep residual learning for image recognition".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Features = dict[str, jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "swish": nn.swish,
    "elu": nn.elu,
}

# Kaiming (He) uniform: U(-b, b) with b = sqrt(6 / fan_in), PyTorch's kaiming_uniform_ for ReLU.
kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# LeCun uniform: U(-b, b) with b = sqrt(3 / fan_in).
lecun_uniform = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

INITIALIZERS: dict[str, nn.initializers.Initializer] = {
    "kaiming_uniform": kaiming_uniform,
    "lecun_uniform": lecun_uniform,
    "kaiming_normal": nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
    "lecun_normal": nn.initializers.lecun_normal(),
    "orthogonal": nn.initializers.orthogonal(),
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name``; a ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def initializer(name: str) -> nn.initializers.Initializer:
    """The kernel initializer called ``name``; a ValueError lists the valid names."""
    if name not in INITIALIZERS:
        raise ValueError(f"unknown initializer {name!r}; choose one of {sorted(INITIALIZERS)}")
    return INITIALIZERS[name]


class MLP(nn.Module):
    """Fully connected network ``x -> [Dense -> (LayerNorm) -> act] x L -> Dense``.

    Inputs of any shape ``(batch, ...)`` are flattened. Hidden layers are named ``hidden_{i}``
    (LayerNorm ``norm_{i}``, applied before the activation as in the paper's LayerNorm+L2
    baseline), the output layer ``head``. Weights use ``kernel_init`` (Kaiming-uniform by
    default, as Dohare et al. and the paper's code), biases start at zero.

    Attributes:
      hidden_sizes: width of each hidden layer, e.g. ``(1000, 1000, 1000)``.
      num_outputs: width of the output layer (classes, or 1 for regression / a critic).
      activation: a name from ``ACTIVATIONS``.
      layer_norm: LayerNorm before each hidden activation.
      kernel_init: a name from ``INITIALIZERS``.
      head_init: initializer of the output layer (defaults to ``kernel_init``).
    """

    hidden_sizes: Sequence[int]
    num_outputs: int
    activation: str = "relu"
    layer_norm: bool = False
    kernel_init: str = "kaiming_uniform"
    head_init: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, Features]:
        chex.assert_rank(x, {2, 3, 4})
        if any(w <= 0 for w in self.hidden_sizes) or self.num_outputs <= 0:
            raise ValueError(
                f"layer widths must be positive, got hidden_sizes={tuple(self.hidden_sizes)} "
                f"and num_outputs={self.num_outputs}"
            )
        act = activation_fn(self.activation)
        h = x.reshape((x.shape[0], -1))
        features: Features = {}
        for i, width in enumerate(self.hidden_sizes):
            h = nn.Dense(width, kernel_init=initializer(self.kernel_init), name=f"hidden_{i}")(h)
            if self.layer_norm:
                h = nn.LayerNorm(name=f"norm_{i}")(h)
            h = act(h)
            features[f"hidden_{i}"] = h
        head_init = initializer(self.head_init or self.kernel_init)
        out = nn.Dense(self.num_outputs, kernel_init=head_init, name="head")(h)
        return out, features


class ConvNet(nn.Module):
    """Dohare et al.'s continual-ImageNet network, for 32x32x3 inputs.

    ``conv 5x5x32 -> pool -> conv 3x3x64 -> pool -> conv 3x3x128 -> pool -> flatten ->
    dense 128 -> dense 128 -> head`` with 2x2 max pooling. ``padding="VALID"`` (the default)
    is Dohare et al.'s PyTorch network (32 -> 28 -> 14 -> 12 -> 6 -> 4 -> 2, so 2*2*128 = 512
    flat features); ``padding="SAME"`` with ``kernel_init="lecun_normal"`` is the paper's code
    (lop-jax ``imagenet/models.py`` lines 11-45: flax's default padding and initializer,
    32 -> 16 -> 8 -> 4, so 4*4*128 = 2048 flat features). Layers are named ``conv_0..2``,
    ``hidden_0..1`` and ``head``; with ``layer_norm`` a LayerNorm (``norm_{layer}``) precedes
    each activation.
    """

    num_outputs: int = 2
    activation: str = "relu"
    layer_norm: bool = False
    kernel_init: str = "kaiming_uniform"
    conv_channels: Sequence[int] = (32, 64, 128)
    conv_kernel_sizes: Sequence[int] = (5, 3, 3)
    hidden_sizes: Sequence[int] = (128, 128)
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, Features]:
        chex.assert_rank(x, 4)
        act = activation_fn(self.activation)
        init = initializer(self.kernel_init)
        if len(self.conv_channels) != len(self.conv_kernel_sizes):
            raise ValueError("conv_channels and conv_kernel_sizes must have the same length")
        if self.padding not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {self.padding!r}")
        features: Features = {}
        h = x
        for i, (channels, size) in enumerate(
            zip(self.conv_channels, self.conv_kernel_sizes, strict=True)
        ):
            name = f"conv_{i}"
            h = nn.Conv(channels, (size, size), padding=self.padding, kernel_init=init,
                        name=name)(h)
            if self.layer_norm:
                h = nn.LayerNorm(name=f"norm_{name}")(h)
            h = nn.max_pool(act(h), window_shape=(2, 2), strides=(2, 2))
            features[name] = h
        h = h.reshape((h.shape[0], -1))
        for i, width in enumerate(self.hidden_sizes):
            name = f"hidden_{i}"
            h = nn.Dense(width, kernel_init=init, name=name)(h)
            if self.layer_norm:
                h = nn.LayerNorm(name=f"norm_{name}")(h)
            h = act(h)
            features[name] = h
        out = nn.Dense(self.num_outputs, kernel_init=init, name="head")(h)
        return out, features


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    channels: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        h = nn.Conv(self.channels, (3, 3), self.strides, padding=1, use_bias=False,
                    kernel_init=kaiming_uniform, name="conv_0")(x)
        h = nn.relu(norm("norm_0")(h))
        h = nn.Conv(self.channels, (3, 3), 1, padding=1, use_bias=False,
                    kernel_init=kaiming_uniform, name="conv_1")(h)
        h = norm("norm_1")(h)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), self.strides, use_bias=False,
                               kernel_init=kaiming_uniform, name="shortcut")(x)
            shortcut = norm("norm_shortcut")(shortcut)
        return nn.relu(h + shortcut)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), as used for class-incremental CIFAR-100.

    Four stages of two ``BasicBlock``s (64, 128, 256, 512 channels; stride 2 from the second
    stage), BatchNorm, global average pooling, then ``head_hidden_sizes`` fully connected ReLU
    layers ``hidden_{i}`` and a linear ``head``. ``head_hidden_sizes=(512, 512)`` is the paper's
    network (lop-jax ``incremental_cifar/model.py`` lines 166-199: ``Dense_0``, ``Dense_1`` of
    512 units before the classifier ``Dense_2``); ``()`` (the default) is Dohare et al.'s, a
    linear head on the pooled features. With ``head_layer_norm`` a LayerNorm (``norm_{i}``)
    precedes each of those ReLUs (lop-jax ``LN_0``, ``LN_1``, the LayerNorm+L2 baseline).
    ``features`` holds the stem output ``stem``, each block's output ``block_{s}_{b}``, the
    pooled representation ``pool`` and each ``hidden_{i}``. Call with ``train=True`` and
    ``mutable=['batch_stats']`` while training.
    """

    num_outputs: int = 100
    stage_channels: Sequence[int] = (64, 128, 256, 512)
    blocks_per_stage: int = 2
    head_hidden_sizes: Sequence[int] = ()
    head_layer_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, Features]:
        chex.assert_rank(x, 4)
        features: Features = {}
        h = nn.Conv(self.stage_channels[0], (3, 3), padding=1, use_bias=False,
                    kernel_init=kaiming_uniform, name="stem")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm_stem")(h)
        h = nn.relu(h)
        features["stem"] = h
        for s, channels in enumerate(self.stage_channels):
            for b in range(self.blocks_per_stage):
                strides = 2 if s > 0 and b == 0 else 1
                name = f"block_{s}_{b}"
                h = BasicBlock(channels, strides, name=name)(h, train)
                features[name] = h
        h = jnp.mean(h, axis=(1, 2))
        features["pool"] = h
        if self.head_layer_norm and not self.head_hidden_sizes:
            raise ValueError("head_layer_norm needs fully connected head layers "
                             "(head_hidden_sizes)")
        for i, width in enumerate(self.head_hidden_sizes):
            h = nn.Dense(width, kernel_init=lecun_uniform, name=f"hidden_{i}")(h)
            if self.head_layer_norm:
                h = nn.LayerNorm(name=f"norm_{i}")(h)
            h = nn.relu(h)
            features[f"hidden_{i}"] = h
        out = nn.Dense(self.num_outputs, kernel_init=lecun_uniform, name="head")(h)
        return out, features


def unit_layers(model: nn.Module) -> list[tuple[str, str]]:
    """The ``(layer, next_layer)`` pairs of ``model`` whose hidden units can be recycled.

    Supports ``MLP``, ``ConvNet`` and the fully connected head layers of a ``ResNet18``
    (``head_hidden_sizes``; its residual channels are not recycled here); anything else raises
    a ValueError.
    """
    if isinstance(model, MLP):
        names = [f"hidden_{i}" for i in range(len(model.hidden_sizes))]
    elif isinstance(model, ConvNet):
        names = [f"conv_{i}" for i in range(len(model.conv_channels))]
        names += [f"hidden_{i}" for i in range(len(model.hidden_sizes))]
    elif isinstance(model, ResNet18) and model.head_hidden_sizes:
        names = [f"hidden_{i}" for i in range(len(model.head_hidden_sizes))]
    else:
        raise ValueError(f"unit recycling supports MLP, ConvNet and a ResNet18 with fully "
                         f"connected head layers (head_hidden_sizes), not "
                         f"{type(model).__name__}")
    return list(zip(names, [*names[1:], "head"], strict=True))


def hidden_layer_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s hidden feature layers, input to output (the keys of ``features``)."""
    if isinstance(model, ResNet18):
        blocks = [
            f"block_{s}_{b}"
            for s in range(len(model.stage_channels))
            for b in range(model.blocks_per_stage)
        ]
        head = [f"hidden_{i}" for i in range(len(model.head_hidden_sizes))]
        return ["stem", *blocks, "pool", *head]
    return [layer for layer, _ in unit_layers(model)]
