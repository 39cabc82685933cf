"""`python -m bench` / `make bench`: training-step throughput side by side in one process."""
