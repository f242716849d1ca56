"""Machinery for the OpenVLA-on-Bridge fine-tuning tutorial (see notebook.py)."""

__version__ = "0.1.0"
