"""The `lora-rlhf` command line: one thin module per command, calling the library."""

import logging

# bitsandbytes warns at import, on every CPU-only run, about an optional kernels package: noise for our users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
