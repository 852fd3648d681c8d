"""`lora-rlhf eval`: held-out evaluation of every policy (`evaluate`) and its report (`report`)."""
