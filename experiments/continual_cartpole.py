"""Continual CartPole: PPO on gymnax CartPole-v1 whose physics change every phase (CPU-fast).

Each phase draws the pole length (0.25-1 m), pole mass (0.05-0.2 kg) and gravity (4.9-19.6
m/s^2) log-uniformly, 0.5x to 2x gymnax's defaults, per seed; the new parameters reach the
compiled loop as data (no recompilation). Two discrete actions, 500-step episodes. The paper
(He et al. 2025) has no CartPole experiment: this is the issue's fast continual-RL stream for
CPU work, with the paper's PPO and per-phase measurements (online episodic return, feature
metrics of actor and critic, weight norms, the Hessian spectral density and epsilon-rank of the
PPO loss at each phase's start and end).

``small``: bp and L2-ER, two seeds, 10 phases of 100k steps, 16 environments x 64 steps per
update, 4 epochs x 4 minibatches, lr 3e-4, hidden 256, 20 Lanczos steps (a few minutes on a
2-core CPU). ``paper``: the paper's PPO protocol (one hidden layer of 256 ReLUs per network,
LeCun uniform, Adam beta1 = beta2 = 0.99) at lr 2.5e-4, 10 phases of 200k steps, 16 x 128
transitions per update in 8 minibatches, 4 epochs, 100 Lanczos steps, every plasticity method
the paper compares on Slippery Ant, five seeds.
"""

from spectral_plasticity.rl.ppo import default_config


def get_config(scale: str = "small"):
    return default_config("continual_cartpole", scale)
