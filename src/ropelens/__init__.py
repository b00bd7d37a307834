"""ropelens: RoPE context-extension methods, seen through attention."""

__version__ = "0.1.0"
