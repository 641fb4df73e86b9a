"""iterwego: order unordered images and sentences of one story (IterWeGO)."""

__version__ = "0.1.0"
