"""Slippery Ant: continual PPO on Brax ``ant`` whose ground friction changes every phase.

Paper protocol (Dohare et al. 2024, "Loss of plasticity in deep continual learning", Nature;
used by He et al. 2025), the ``paper`` scale: the sliding friction of every geom is drawn
log-uniformly in [0.02, 2.0] and changed every 2M environment steps, 10 phases (20M steps).
PPO with separate actor and critic, each one hidden layer of 256 ReLUs (LeCun uniform), Adam
(lr 1e-4, beta1 = beta2 = 0.99), 2,048 transitions per update, 10 epochs, gamma 0.99, GAE
lambda 0.95, clip 0.2, value coefficient 1, entropy 0.01; PPO+L2 weight decay 1e-3. Five seeds,
every plasticity method that PPO runs. Per phase: online episodic return, feature metrics of both
networks, weight norms, and the Hessian spectral density and epsilon-rank of the PPO loss on a
fresh rollout at the phase's start and end (100 Lanczos steps).

``small`` (a 2-core CPU, about 10 minutes): bp and L2-ER, two seeds, 3 phases of 200k steps,
64 environments x 32 steps per update, 4 epochs x 8 minibatches, lr 1e-3, 20 Lanczos steps; the
actor's output weights start 100x smaller and its log-std at -1 so that the short budget is
spent learning to walk rather than to end episodes early (``rl.ppo.default_config``). The
return rises within each phase (``results.csv``: ``episode_return`` over the phase,
``episode_return_last`` over its last tenth; ``arrays/``: the return per update).
"""

from spectral_plasticity.rl.ppo import default_config


def get_config(scale: str = "small"):
    return default_config("slippery_ant", scale)
