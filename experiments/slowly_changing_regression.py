"""Slowly-changing regression (Dohare et al. 2024), no data needed.

Paper scale: Dohare et al.'s published protocol (``lop/slowly_changing_regression``): 1M
examples online (batch 1) = 100 tasks of 10,000 (``cfg/sgd/bp/relu.json``), one of the 15 slow
bits flipped between tasks (their paper's description and ``cfg/flip_one/relu.json``, which
runs 3M examples; ``relu.json``'s data redraw every slow bit: ``stream.flip_one=False``), a
learner MLP with 5 ReLU hidden units, plain SGD at step size 0.01, squared error. The
performance is their measure, the online squared error over each task (``train_loss``); 30
seeds (they recommend at least 30 runs: single runs vary widely). Each method's paper setting
is re-derived for 10,000 steps of 0.01 per task (``spectral_plasticity.tuning``). He et al. do
not run this benchmark; it is here as the cheapest continual problem with a published loss of
plasticity.

Small scale: a 40-task miniature with Adam (tasks of 2,000 examples) for quick checks.
"""

import ml_collections

from spectral_plasticity.train.supervised import default_config
from spectral_plasticity.tuning import derived_settings

PAPER_METHODS = ("bp", "l2", "er", "l2_er", "cbp", "shrink_perturb", "reset")


def get_config(scale: str = "small"):
    config = default_config()
    config.stream = ml_collections.ConfigDict({
        "name": "slowly_changing_regression", "num_tasks": 40, "flip_after": 2000,
        "flip_one": True, "eval_size": 1024, "data_dir": ""})
    config.model.hidden_sizes = (5,)
    config.batch_size = 1
    config.methods = ("bp", "l2", "l2_er", "cbp")
    config.plots.performance = "eval_loss"
    config.plots.performance_label = "held-out squared error"
    config.method_settings.erank_layers = "all"
    # 111 parameters: Lanczos exhausts the Hessian's Krylov space (exact quadrature), and one
    # Gaussian probe's mass has a standard deviation of up to sqrt(2 x 0.25 / 113) = 0.067, so
    # 32 probes keep the interval's half-width (2 standard errors) <= 0.024 (docs/MEASURING.md).
    config.hessian.update(eps=0.01, examples=1000, num_iters=30, num_probes=32)
    if scale == "paper":
        config.stream.num_tasks, config.stream.flip_after = 100, 10_000
        config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.01
        config.plots.performance = "train_loss"
        config.plots.performance_label = "online squared error"
        config.methods = PAPER_METHODS
        config.method_settings_by_method = ml_collections.ConfigDict(
            derived_settings(PAPER_METHODS, learning_rate=0.01, steps_per_task=10_000))
        config.tasks_per_chunk = 10
        config.seeds = 30
    else:
        config.optimizer.name, config.optimizer.learning_rate = "adam", 1e-2
        config.stream.num_tasks, config.stream.flip_after = 40, 2000
        config.tasks_per_chunk = 10
        config.seeds = 5
    return config
