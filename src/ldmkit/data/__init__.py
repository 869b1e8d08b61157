"""Datasets: the procedural shapes world (and, later, image folders, tar shards, latent caches)."""
