"""Training: one loop (loop.py) and one module per thing trained."""
