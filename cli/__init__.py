"""The `lora-rlhf` command line: one thin module per command, calling the library."""
