"""Measuring models: the shapes judge and image metrics."""
