"""Loss functions. Every loss takes HF-convention (unshifted) labels and shifts them itself."""
