"""sslrecipe: evidence-based self-supervised pre-training recipes for small-object detection."""

__version__ = "0.1.0"
