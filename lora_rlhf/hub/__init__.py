"""Layer 3, the Hugging Face Hub: push / pull (`client`), model cards (`card`) and merging for serving (`merge`).

Hub references (`user/name[@revision][:subfolder]`) become local folders here, before core sees them.
"""

# `push --what`: which adapters of a run folder go up (kept here, free of torch, so the CLI's --help stays fast)
WHAT_CHOICES = ("policy", "dpo", "reward", "value", "all")
