"""pyclloss: fused contrastive-learning losses for PyTorch."""

__version__ = "0.1.0"
