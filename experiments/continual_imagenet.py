"""Continual ImageNet (Dohare et al. 2024; the paper's ConvNet benchmark).

Paper scale (the paper's code, lop-jax ``imagenet/``; file and line of every value in
``get_config``): 2,000 binary tasks, each a pair of 32x32 ImageNet classes (600 training and
100 test images per class) trained for 20 epochs, batch 100, SGD with momentum 0.9, the
ConvNet as lop-jax builds it (SAME padding, LeCun-normal init, a 2,048-wide flatten), no head
reset, the start-of-task Hessian (100 Lanczos steps) on the pair's 1,200 training images every
10 tasks with eps 8e-2, the per-method selected values (step size 1e-4, but 1e-3 for L2-ER and
LayerNorm+L2 and 1e-2 for spectral-norm), 20 seeds. Dohare et al. train 250 epochs per task
(``stream.epochs_per_task``), zero the head at every task (``head_reset="stream"``, after the
start-of-task Hessian) and use unpadded convolutions (``model.padding="VALID"``). Small scale,
for a CPU: 10 classes, 10 tasks of 2 epochs at step size 1e-2, Dohare et al.'s network and head
reset.

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
        # The paper's code, lop-jax (KevinGuo27/lop-jax @ 52ae3eb), imagenet/: config.py 26-28
        # (2,000 tasks, 20 epochs, momentum 0.9), 23 (batch 100), 31 with train_imagenet.py
        # 277 (ER every 12 batches on those 1,200 inputs), 56-59 (CBP decay 0.99, maturity
        # 100); models.py 11-45 (the ConvNet: flax's SAME padding and LeCun-normal init, a
        # 2,048-wide flatten); train_imagenet.py 330-360 (the Hessian at the task's start,
        # 100 Lanczos steps, on the pair's training images, no head reset anywhere); the
        # selected values from scripts/hyperparams/hessian/<method>_hessian.py, lines 5-8:
        # step size 1e-4 but L2-ER and LayerNorm+L2 1e-3 and spectral-norm 1e-2, the Hessian
        # every 10 tasks, 20 seeds (2035 + i for i in range(20)).
        config.stream.update(num_tasks=2000, epochs_per_task=20, num_classes=1000)
        config.model.update(padding="SAME", kernel_init="lecun_normal")
        config.tasks_per_chunk = 10
        config.head_reset = "never"
        config.hessian.update(num_iters=100, grid_size=10_000, examples=1200, data="train",
                              eps=8e-2)  # eps: lop-jax analysis/fig5.py:62
        config.method_settings.update(cbp_decay=0.99, maturity_threshold=100)
        config.optimizer_by_method = {
            "l2_er": {"learning_rate": 1e-3},  # l2_er_hessian.py:5
            "layernorm_l2": {"learning_rate": 1e-3},  # laynorm_l2_hessian.py:5
            "spectral_norm": {"learning_rate": 1e-2},  # spectral_reg_hessian.py:5
        }
        config.method_settings_by_method = {
            "l2": {"l2": 1e-3},  # l2_hessian.py:6
            "l2_er": {"l2": 1e-3, "erank_learning_rate": 1e-4},  # l2_er_hessian.py:6-8
            "er": {"erank_learning_rate": 1e-5},  # er_hessian.py:6
            "cbp": {"replacement_rate": 1e-5},  # cbp_hessian.py:6
            "layernorm_l2": {"l2": 1e-5},  # laynorm_l2_hessian.py:6
            "spectral_norm": {"spectral_norm": 1e-2},  # spectral_reg_hessian.py:6
        }
        config.methods = ("bp", "l2", "er", "l2_er", "cbp", "layernorm_l2", "spectral_norm")
        config.seeds = 20
    else:
        config.optimizer.learning_rate = 1e-2
        config.tasks_per_chunk = 5
        config.hessian.update(num_iters=20, grid_size=1000)
        config.seeds = 2
    return config
