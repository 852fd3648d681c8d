"""Layer 1, the recipe: its typed schema (`config`), the checks behind it (`schema`) and the PPO section (`ppo`).

Imports nothing of ours but `lora_rlhf.errors`: a recipe can be read and validated without torch or a model.
"""
