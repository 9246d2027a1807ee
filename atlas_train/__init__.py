"""atlas-train: distributed pretraining of ATLAS-family language models."""

__version__ = "0.1.0"
