"""alignment: Hydra-configured alignment of text-to-image diffusion models with human preferences."""

__version__ = "0.1.0"
