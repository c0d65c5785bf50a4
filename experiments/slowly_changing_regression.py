"""Slowly-changing regression (Dohare et al. 2024), no data needed.

Paper scale (Dohare et al.): 1M examples online = 100 tasks of 10,000, a learner MLP with 5
hidden units, Adam, squared error. The paper's other benchmarks do not include it; it is here as
the cheapest continual problem with a known loss of plasticity.
"""

import ml_collections

from spectral_plasticity.train.supervised import default_config


def get_config(scale: str = "small"):
    config = default_config()
    config.stream = ml_collections.ConfigDict({
        "name": "slowly_changing_regression", "num_tasks": 40, "flip_after": 2000,
        "eval_size": 1024, "data_dir": ""})
    config.model.hidden_sizes = (5,)
    config.optimizer.name, config.optimizer.learning_rate = "adam", 1e-2
    config.batch_size = 1
    config.methods = ("bp", "l2", "l2_er", "cbp")
    config.plots.performance = "eval_loss"
    config.plots.performance_label = "held-out squared error"
    config.method_settings.erank_layers = "all"
    config.hessian.update(eps=0.01, examples=1000, num_iters=30)
    if scale == "paper":
        config.stream.num_tasks, config.stream.flip_after = 100, 10_000
        config.tasks_per_chunk = 10
        config.seeds = 30
    else:
        config.stream.num_tasks, config.stream.flip_after = 40, 2000
        config.tasks_per_chunk = 10
        config.seeds = 5
    return config
