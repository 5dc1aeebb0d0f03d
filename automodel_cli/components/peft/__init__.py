"""Parameter-efficient fine-tuning through the peft library."""
