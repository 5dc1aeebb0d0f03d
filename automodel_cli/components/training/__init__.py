"""Training-loop helpers: the data order, micro-batching, evaluation and progress display."""
