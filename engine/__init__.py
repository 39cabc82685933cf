"""Data, the one trainer, checkpoints and run records (everything around a method)."""
