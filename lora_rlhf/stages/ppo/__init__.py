"""Step 3: PPO on one shared base (policy, reference, reward and value as adapters)."""
