"""Rooftop agent: says whether each GPU is memory-, compute- or host-bound."""

__version__ = "0.1.0"
__all__ = ["__version__"]
