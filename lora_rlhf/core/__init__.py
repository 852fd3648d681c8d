"""Layer 2, the core every stage builds on: loading (the only place a model is loaded), the shared base and its
roles, adapters and their metadata, text (chat templates, tokenising, padding), data, heads, generation,
scoring, io and logs.

Imports `lora_rlhf.recipe` and `lora_rlhf.errors` only; knows nothing of the Hub (hub/ turns Hub references
into local folders before core sees them) nor of any stage.
"""
