"""vistok: visual tokenizers and the generators that work in their latent space."""

__version__ = "0.1.0"
