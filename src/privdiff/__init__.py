"""privdiff: privacy-preserving diffusion models on one correct privacy core."""

__version__ = "0.1.0"
