"""The networks: one configurable U-Net, the VAE, the text encoders, and their named presets."""
