"""The three networks of a latent diffusion model, and the bundle that holds them."""
