"""Building blocks shared by the autoencoder, the UNet and (later) ControlNet."""
