"""The paper-scale configs resolve, per method, to the values of the paper's code.

The tables below are copied by hand from the seed authors' scripts (lop-jax, KevinGuo27/lop-jax
@ 52ae3eb; file and line beside each value), independently of the experiment files, so that an
edit of a config that drifts from the paper fails here. Every value is read back through the
same resolution the runner uses (``experiment.method_config`` for the optimizer,
``method_registry.config_settings`` for the method's settings).
"""

import pytest

from spectral_plasticity import experiment
from spectral_plasticity.train import method_registry

# (method) -> {setting or optimizer option: value}; "learning_rate" is the step size.
PAPER = {
    "permuted_mnist": {  # permuted_mnist/scripts/hyperparams/hessian/fix_lr/*_fix_lr.py 5-7
        "bp": {"learning_rate": 1e-2},
        "l2": {"learning_rate": 1e-2, "l2": 1e-4},
        "er": {"learning_rate": 1e-2, "erank_learning_rate": 1e-4},
        "l2_er": {"learning_rate": 1e-2, "l2": 1e-3, "erank_learning_rate": 1e-2},
        "layernorm_l2": {"learning_rate": 1e-2, "l2": 1e-5},
        "cbp": {"learning_rate": 1e-2, "replacement_rate": 1e-6, "maturity_threshold": 100,
                "cbp_decay": 0.99},  # permuted_mnist/config.py 56-57
        "spectral_norm": {"learning_rate": 1e-2, "spectral_norm": 1e-3},
    },
    "continual_imagenet": {  # imagenet/scripts/hyperparams/hessian/*_hessian.py 5-8
        "bp": {"learning_rate": 1e-4},
        "l2": {"learning_rate": 1e-4, "l2": 1e-3},
        "er": {"learning_rate": 1e-4, "erank_learning_rate": 1e-5},
        "l2_er": {"learning_rate": 1e-3, "l2": 1e-3, "erank_learning_rate": 1e-4},
        "cbp": {"learning_rate": 1e-4, "replacement_rate": 1e-5, "maturity_threshold": 100},
        "layernorm_l2": {"learning_rate": 1e-3, "l2": 1e-5},
        "spectral_norm": {"learning_rate": 1e-2, "spectral_norm": 1e-2},
    },
    "incremental_cifar": {  # incremental_cifar/scripts/hyperparams/hessian/*_hessian.py 5-7
        "bp": {"learning_rate": 1e-2},
        "l2": {"learning_rate": 1e-2, "l2": 1e-4},
        "er": {"learning_rate": 1e-2, "erank_learning_rate": 1e-4},
        "l2_er": {"learning_rate": 1e-2, "l2": 1e-3, "erank_learning_rate": 1e-3},
        "cbp": {"learning_rate": 1e-2, "replacement_rate": 1e-6, "maturity_threshold": 100},
        "layernorm_l2": {"learning_rate": 1e-2, "l2": 1e-4},
        "spectral_norm": {"learning_rate": 1e-2, "spectral_norm": 1e-2},
        "reset": {"learning_rate": 1e-2},
    },
    "slippery_ant": {  # rlopt/scripts/hyperparams/nonstationary/hessian/*_hessian.py 5-10
        "bp": {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.999},  # rlopt/config.py 33-34
        "l2": {"learning_rate": 1e-4, "b1": 0.99, "b2": 0.99, "l2": 1e-3},
        "er": {"learning_rate": 1e-4, "b1": 0.99, "b2": 0.99, "erank_learning_rate": 1e-7},
        "l2_er": {"learning_rate": 1e-4, "b1": 0.99, "b2": 0.99, "l2": 1e-3,
                  "erank_learning_rate": 1e-6},
        "cbp_l2": {"learning_rate": 1e-4, "b1": 0.99, "b2": 0.99, "l2": 1e-3,
                   "replacement_rate": 1e-7, "maturity_threshold": 10_000},
        "spectral_norm": {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.999},
    },
}
# Protocol values shared by a benchmark's methods: (config path, value).
PROTOCOL = {
    "permuted_mnist": {"stream.num_tasks": 800, "batch_size": 1, "tasks_per_chunk": 10,
                       "hessian.eps": 1e-2, "hessian.examples": 2000, "hessian.data": "train",
                       "seeds": 5,
                       "model.hidden_sizes": (1000, 1000, 1000),
                       "plots.performance": "train_accuracy"},  # analysis/fig3.py 264
    "continual_imagenet": {"stream.num_tasks": 2000, "stream.epochs_per_task": 20,
                           "batch_size": 100, "tasks_per_chunk": 10, "hessian.eps": 8e-2,
                           "hessian.num_iters": 100, "hessian.data": "train",
                           "head_reset": "never", "model.padding": "SAME",
                           "model.kernel_init": "lecun_normal", "seeds": 20},
    "incremental_cifar": {"stream.num_tasks": 20, "batch_size": 100, "tasks_per_chunk": 1,
                          "hessian.eps": 4e-2, "hessian.num_iters": 16,
                          "hessian.data": "train", "hessian.examples": 2000,
                          "stream.hessian_classes": "new",
                          "model.head_hidden_sizes": (512, 512), "seeds": 5},
    "slippery_ant": {"num_phases": 5, "steps_per_phase": 2_000_000, "ppo.num_envs": 1,
                     "ppo.num_steps": 2048, "ppo.num_minibatches": 128, "ppo.update_epochs": 10,
                     "ppo.gae_lambda": 0.95, "ppo.clip_eps": 0.2, "ppo.ent_coef": 0.01,
                     "ppo.clip_value": True, "ppo.vf_coef": 2.0, "seeds": 5},
}


def _resolved(name, method):
    run = experiment.method_config(experiment.load_config(name, "paper"), method)
    return {**dict(run.optimizer), **method_registry.config_settings(run)}, run


def _get(config, path):
    for part in path.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_scale_resolves_every_method_to_the_paper_values(name):
    config = experiment.load_config(name, "paper")
    assert set(PAPER[name]) <= set(config.methods), name
    for method, expected in PAPER[name].items():
        resolved, _ = _resolved(name, method)
        for key, value in expected.items():
            assert resolved[key] == pytest.approx(value), (name, method, key)


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_paper_scale_protocol(name):
    config = experiment.load_config(name, "paper")
    for path, value in PROTOCOL[name].items():
        got = _get(config, path)
        assert (tuple(got) if isinstance(got, tuple | list) else got) == value, (name, path)


@pytest.mark.parametrize("name", ["permuted_mnist", "continual_imagenet", "incremental_cifar"])
def test_the_er_step_sees_the_batches_since_the_last_one(name):
    """erank_batch == erank_every x batch_size (ImageNet 12 x 100, CIFAR 5 x 100, MNIST 100 x 1)."""
    for method in ("er", "l2_er"):
        settings, run = _resolved(name, method)
        assert settings["erank_batch"] == settings["erank_every"] * run.batch_size


def test_ppo_er_step_is_once_per_epoch_on_the_whole_rollout():
    for method in ("er", "l2_er"):
        settings, run = _resolved("slippery_ant", method)
        assert settings["erank_every"] == run.ppo.num_minibatches
        assert settings["erank_batch"] == run.ppo.num_envs * run.ppo.num_steps


def test_a_mismatched_er_window_is_refused():
    from spectral_plasticity.train import supervised

    config = supervised.default_config()
    config.stream = {"name": "slowly_changing_regression", "num_tasks": 5, "flip_after": 100,
                     "eval_size": 10, "data_dir": ""}
    config.model.hidden_sizes = (5,)
    config.method = "l2_er"
    config.batch_size = 10
    config.method_settings.update(erank_every=5, erank_batch=10)
    with pytest.raises(ValueError, match=r"erank_batch 10 must be erank_every x batch_size = 50"):
        supervised.make_train(config)


def test_an_unknown_per_method_optimizer_option_is_refused():
    config = experiment.load_config("continual_imagenet", "paper")
    config.optimizer_by_method = {"l2": {"b1": 0.9}}
    with pytest.raises(ValueError, match=r"optimizer_by_method.l2: unknown optimizer options"):
        experiment.method_config(config, "l2")
