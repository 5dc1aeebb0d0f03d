"""Loading Hugging Face models and tokenizers with clear errors."""
