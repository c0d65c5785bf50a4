"""Permuted MNIST (the paper's Fig. 1/2 protocol at `paper` scale).

Paper: 800 tasks, each a fresh pixel permutation of all 60,000 training images seen once online
(batch 1), MLP 3x1000 (ReLU, Kaiming-uniform), SGD 1e-2, 2,000 held-out images per task for
evaluation and the Hessian (every 10 tasks, eps 1e-2), the per-method values the paper's code
selected (lop-jax; file and line in ``get_config``), the online training accuracy as the
performance. MNIST is downloaded (md5-checked) into the cache on first use.
"""

import ml_collections

from spectral_plasticity.train.supervised import default_config
from spectral_plasticity.tuning import derived_settings

ALL_METHODS = ("bp", "l2", "l2_init", "er", "l2_er", "l2_er_joint", "cbp", "redo",
               "layernorm_l2", "spectral_norm", "parseval", "shrink_perturb", "reset")
# The CPU study's methods: those of the paper's claims.
SMALL_METHODS = ("bp", "l2_er", "reset", "l2", "er", "layernorm_l2", "cbp")


def get_config(scale: str = "small"):
    config = default_config()
    config.stream.name = "permuted_mnist"
    config.methods = ("bp", "l2", "l2_er")
    config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e-2
    config.batch_size = 1
    config.method_settings.l2 = 1e-4
    config.method_settings.erank_learning_rate = 1e-3
    config.hessian.eps = 0.01  # the paper's for Permuted MNIST (lop-jax analysis/fig5.py:79)
    # KFAC factors A and G of every layer at each measured new-task initialization, compared
    # with the exact GGN block of the first hidden layer and the head. On at the paper scale;
    # the CPU scale leaves it off for time (OVERRIDES="kfac.enabled=True" turns it on).
    config.kfac.update(enabled=scale == "paper", compare_layers=("hidden_0", "head"))
    if scale == "paper":
        # The paper's code, lop-jax (KevinGuo27/lop-jax @ 52ae3eb), permuted_mnist/: config.py
        # 31 (800 tasks), 22/26 (3 x 1000), 48/50 (2,000 eval and Hessian examples), 35
        # (er_batch 100 with batch 1: ER every 100 steps on those 100 inputs), 56-57 (CBP
        # decay 0.99, maturity 100); every selected value below from
        # scripts/hyperparams/hessian/fix_lr/<method>_hessian_fix_lr.py, lines 5-7: lr 1e-2 for
        # every method, the Hessian every 10 tasks (line 17), 5 seeds (line 19).
        config.stream.num_tasks, config.stream.train_size = 800, 60_000
        config.stream.eval_size = 2000
        config.model.hidden_sizes = (1000, 1000, 1000)
        config.tasks_per_chunk = 10
        # The Hessian on the new task's training images (train_permuted_mnist.py 436; the
        # held-out ones at 421 are hessian.data="eval").
        config.hessian.update(num_iters=100, grid_size=10_000, examples=2000, chunk_size=100,
                              data="train")
        config.method_settings.update(erank_every=100, erank_batch=100, cbp_decay=0.99,
                                      maturity_threshold=100)
        config.method_settings_by_method = {
            "l2": {"l2": 1e-4},  # l2_hessian_fix_lr.py:6
            "l2_er": {"l2": 1e-3, "erank_learning_rate": 1e-2},  # l2_er_hessian_fix_lr.py:6-7
            "er": {"erank_learning_rate": 1e-4},  # er_hessian_fix_lr.py:6
            "layernorm_l2": {"l2": 1e-5},  # laynorm_l2_hessian_fix_lr.py:6
            "cbp": {"replacement_rate": 1e-6},  # cbp_hessian_fix_lr.py:6
            "spectral_norm": {"spectral_norm": 1e-3},  # spectral_reg_hessian_fix_lr.py:6
        }
        # The paper plots the online training accuracy (lop-jax analysis/fig3.py:264).
        config.plots.update(performance="train_accuracy",
                            performance_label="online training accuracy")
        config.methods = ALL_METHODS
        config.seeds = 5
    else:
        config.stream.num_tasks, config.stream.train_size = 30, 1000
        config.stream.eval_size = 500
        config.model.hidden_sizes = (100, 100, 100)
        config.tasks_per_chunk = 5
        # At this width (lambda_max 20-100) 0.01 is below what 100 Lanczos steps resolve
        # (docs/MEASURING.md); at 0.1 the interval's half-width is <= 0.03.
        config.hessian.update(num_iters=100, eps=0.1)
        config.seeds = 3
        # Step size 0.03 so that backprop loses plasticity within 30 tasks of 1,000 steps; each
        # method's paper setting re-derived for that (spectral_plasticity.tuning: L2 2e-3, L2-ER
        # 2e-2 with ascent 3e-2, ER 3e-4, LayerNorm+L2 2e-4, CBP 6e-5).
        config.optimizer.learning_rate = 0.03
        config.methods = SMALL_METHODS
        config.method_settings_by_method = ml_collections.ConfigDict(
            derived_settings(SMALL_METHODS, learning_rate=0.03, steps_per_task=1000))
    return config
