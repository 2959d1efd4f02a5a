"""scratchlm: train decoder-only transformer language models from scratch on your own documents."""

__version__ = "0.1.0"
