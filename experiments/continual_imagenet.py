"""Continual ImageNet (Dohare et al. 2024; the paper's ConvNet benchmark).

Paper scale (the paper's code, lop-jax ``imagenet/``): 2,000 binary tasks, each a pair of
32x32 ImageNet classes (600 training and 100 test images per class) trained for 20 epochs,
batch 100, SGD with momentum 0.9 at step size 1e-4 (L2 1e-3, effective-rank ascent at 1e-4
every 12 batches on the last two hidden layers over those 12 batches' 1,200 inputs), Dohare et
al.'s ConvNet with its head reset at every task, the new-task Hessian (100 Lanczos steps, the
pair's 200 test images) every 10 tasks, 20 seeds. Dohare et al. train 250 epochs per task
(``stream.epochs_per_task``). Small scale, for a CPU: 10 classes, 10 tasks of 2 epochs at step
size 1e-2.

Data: Dohare et al.'s per-class files (``classes/0.npy`` ... ``classes/999.npy``), from the
Google Drive link of github.com/shibhansh/loss-of-plasticity/tree/main/lop/imagenet, in
$SPECTRAL_PLASTICITY_DATA/continual_imagenet or ``stream.data_dir``.
"""

import ml_collections

from spectral_plasticity.train.supervised import default_config


def get_config(scale: str = "small"):
    config = default_config()
    config.stream = ml_collections.ConfigDict({
        "name": "continual_imagenet", "num_tasks": 10, "epochs_per_task": 2,
        "classes_per_task": 2, "num_classes": 10, "data_dir": ""})
    config.model = ml_collections.ConfigDict({"kind": "convnet", "activation": "relu"})
    config.optimizer = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 1e-4,
                                                  "momentum": 0.9})
    config.batch_size = 100
    config.methods = ("bp", "l2", "l2_er")
    config.method_settings.update(l2=1e-3, erank_learning_rate=1e-4, erank_every=12,
                                  erank_batch=1200, erank_layers="last_two")
    config.hessian.update(examples=200, eps=0.01)
    if scale == "paper":
        config.stream.update(num_tasks=2000, epochs_per_task=20, num_classes=1000)
        config.tasks_per_chunk = 10
        config.hessian.update(num_iters=100, grid_size=10_000)
        config.methods = ("bp", "l2", "er", "l2_er", "cbp", "layernorm_l2", "spectral_norm")
        config.seeds = 20
    else:
        config.optimizer.learning_rate = 1e-2
        config.tasks_per_chunk = 5
        config.hessian.update(num_iters=20, grid_size=1000)
        config.seeds = 2
    return config
