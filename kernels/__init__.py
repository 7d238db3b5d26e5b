"""Triton kernels of taste-kernels, installed as the sub-package ``taste.kernels``."""
