"""Slippery Ant: continual PPO on Brax ``ant`` whose ground friction changes every phase.

Paper protocol (He et al. 2025; the paper's code, lop-jax ``rlopt/``, after Dohare et al. 2024),
the ``paper`` scale: the sliding friction of every geom is drawn log-uniformly in [0.02, 2.0]
and changed every 2M environment steps, 5 phases (10M steps). PPO with separate actor and
critic, each one hidden layer of 256 ReLUs (LeCun uniform), Adam at lr 1e-4, one environment x
2,048 steps per update in 128 minibatches, 10 epochs, gamma 0.99, GAE lambda 0.95, clip 0.2,
value coefficient 1, entropy 0.01; Adam betas (0.99, 0.99) for L2, ER, L2-ER, CBP+L2,
LayerNorm+L2 and Shrink & Perturb, (0.9, 0.999) for backprop and spectral-norm; L2 1e-3; ER
ascent once per epoch on the whole rollout at 1e-7 (ER) or 1e-6 (L2-ER); CBP+L2 at replacement
rate 1e-7 and maturity 1e4. Five seeds. Per phase: online episodic return, feature metrics of
both networks, weight norms, and the Hessian spectral density and epsilon-rank of the PPO loss
on a fresh rollout at the phase's start and end (100 Lanczos steps). Dohare et al. run 10
phases (20M steps) of 16 x 128 transitions in 16 minibatches with betas (0.99, 0.99) for
every method (``rl.ppo.default_config``).

``small`` (a 2-core CPU, about 10 minutes): bp and L2-ER, two seeds, 3 phases of 200k steps,
64 environments x 32 steps per update, 4 epochs x 8 minibatches, lr 1e-3, 20 Lanczos steps; the
actor's output weights start 100x smaller and its log-std at -1 so that the short budget is
spent learning to walk rather than to end episodes early (``rl.ppo.default_config``). The
return rises within each phase (``results.csv``: ``episode_return`` over the phase,
``episode_return_last`` over its last tenth; ``arrays/``: the return per update).
"""

from spectral_plasticity.rl.ppo import default_config

# Adam's betas (0.99, 0.99) where the paper's scripts set them (lop-jax
# rlopt/scripts/hyperparams/nonstationary/: l2.py, er.py, l2_er.py, cbp_l2.py, layernorm_l2.py,
# snp_l2.py: 'beta_1': 0.99, 'beta_2': 0.99); bp.py and spectral_reg.py keep rlopt/config.py
# 33-34 (0.9, 0.999).
NON_STATIONARY_BETAS = {"b1": 0.99, "b2": 0.99}


def get_config(scale: str = "small"):
    config = default_config("slippery_ant", scale)
    if scale == "paper":
        # lop-jax rlopt/scripts/hyperparams/nonstationary/hessian/bp_hessian.py 5-23:
        # 10M steps, friction every 2M, 1 env x 2,048 steps, 128 minibatches, 10 epochs,
        # vf_coeff 1, lr 1e-4; rlopt/config.py 33-34, 40, 64 (betas, CBP maturity, clip 0.2).
        config.num_phases, config.steps_per_phase = 5, 2_000_000
        # Their value loss is clipped and has no factor 0.5 (rlopt/ppo_nonstationary.py
        # 103-110); ours carries 0.5, so vf_coef 2 is their vf_coeff 1.
        config.ppo.update(num_envs=1, num_steps=2048, num_minibatches=128, update_epochs=10,
                          vf_coef=2.0, clip_value=True)
        config.optimizer.update(learning_rate=1e-4, b1=0.9, b2=0.999)
        config.optimizer_by_method = {m: dict(NON_STATIONARY_BETAS) for m in (
            "l2", "er", "l2_er", "cbp_l2", "layernorm_l2", "shrink_perturb")}
        # ER once per epoch (every 128 minibatch steps) on the whole 2,048-step rollout:
        # ppo_nonstationary.py 467-515 with er_batch 128 = num_minibatches.
        config.method_settings.update(erank_every=128, erank_batch=2048, l2=1e-3,
                                      cbp_decay=0.99)
        config.method_settings_by_method = {
            "er": {"erank_learning_rate": 1e-7},  # hessian/er_hessian.py:8
            "l2_er": {"erank_learning_rate": 1e-6, "l2": 1e-3},  # hessian/l2_er_hessian.py:8-10
            "l2": {"l2": 1e-3},  # hessian/l2_hessian.py:8
            "cbp_l2": {"replacement_rate": 1e-7, "maturity_threshold": 10_000,  # cbp_l2_hessian
                       "l2": 1e-3},  # .py:8-9, 25
        }
    return config
