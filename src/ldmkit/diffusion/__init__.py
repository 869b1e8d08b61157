"""Diffusion maths: noise schedules, the denoiser (parameterisation + guidance) and samplers."""
