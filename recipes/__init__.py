"""Built-in recipes: one readable, linear training script per command."""
