"""Building blocks that recipes compose (data, models, peft, loss, checkpoint, ...)."""
