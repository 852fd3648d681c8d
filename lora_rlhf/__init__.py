"""lora-rlhf: the InstructGPT recipe (SFT -> reward model -> PPO-ptx) on one shared 4-bit base."""

__version__ = "0.1.0"
