"""Small models and data for curvature tests, with dense references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree


class SmallMLP(nn.Module):
    """8 inputs -> dense 16 -> tanh -> dense 16 -> tanh -> head 4 (484 params), as our models:
    layers ``hidden_{i}`` and ``head``, returning ``(outputs, features)``."""

    @nn.compact
    def __call__(self, x):
        features = {}
        for i in range(2):
            x = features[f"hidden_{i}"] = jnp.tanh(nn.Dense(16, name=f"hidden_{i}")(x))
        return nn.Dense(4, name="head")(x), features


class SmallConvNet(nn.Module):
    """8x8x2 inputs -> conv 3x3x3 -> tanh -> pool -> dense 5 -> tanh -> head 3 (215 params)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding="VALID", name="conv_0")(x)
        h = nn.max_pool(jnp.tanh(h), (2, 2), (2, 2)).reshape((x.shape[0], -1))
        h = jnp.tanh(nn.Dense(5, name="hidden_0")(h))
        return nn.Dense(3, name="head")(h), {"hidden_0": h}


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class Problem:
    """A model, its params and data, the full-batch loss and its dense Hessian."""

    def __init__(self, model, inputs, labels, seed=0):
        self.model = model
        self.inputs, self.labels = inputs, labels
        self.params = model.init(jax.random.key(seed), inputs)["params"]
        self.apply = lambda p, x: model.apply({"params": p}, x)
        self._hessian = None

    def loss(self, params):
        return jnp.mean(cross_entropy(self.apply(params, self.inputs)[0], self.labels))

    def dense_hessian(self):
        if self._hessian is None:
            flat, unravel = ravel_pytree(self.params)
            hessian = jax.jit(jax.hessian(lambda f: self.loss(unravel(f))))(flat)
            self._hessian = np.asarray(hessian, np.float64)
        return self._hessian


@pytest.fixture(scope="session")
def mlp_problem():
    key_x, key_y = jax.random.split(jax.random.key(42))
    inputs = jax.random.normal(key_x, (64, 8))
    labels = jax.random.randint(key_y, (64,), 0, 4)
    return Problem(SmallMLP(), inputs, labels)


@pytest.fixture(scope="session")
def conv_problem():
    key_x, key_y = jax.random.split(jax.random.key(7))
    inputs = jax.random.normal(key_x, (16, 8, 8, 2))
    labels = jax.random.randint(key_y, (16,), 0, 3)
    return Problem(SmallConvNet(), inputs, labels)
