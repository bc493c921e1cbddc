"""HM3's architecture space as reinforcement learning: the layer-path MDP (`env`, gymnax-style, with the reward
`env.length_penalised`), block descriptors, the preference-conditioned actor-critic (`network`) with Wolpertinger
selection, and PPO as purejaxrl splits it (`rollout`, `update`, `ppo.make_train(config) -> train(key)`), trained
in checkpointed chunks by `loop`. Import the modules (`from hm3_jax.arch import ppo`); this file only makes
`hm3_jax.arch` a regular package, so that `pip install .` ships it."""
