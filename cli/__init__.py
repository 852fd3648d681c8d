"""The `lora-rlhf` command line: one thin module per command, calling the library.

The folder is cli/; it installs as the package `lora_rlhf_cli` (pyproject.toml), a name no other project's
`cli` collides with in site-packages.
"""

import logging
import warnings

# bitsandbytes warns at import, on every CPU-only run, about an optional kernels package: noise for our users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# transformers 5.x renames gradient_checkpointing -> activation_checkpointing; TRL (and PEFT) still use the old
# names internally, so every training run printed warnings a user can do nothing about.
warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
