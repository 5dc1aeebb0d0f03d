"""Starting a recipe's processes: in this process, or several through torchrun."""
