"""Kernel sources (``montgomery.h``: CUDA and plain C from one file). Data only; no Python logic."""
