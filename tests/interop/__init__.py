"""Interop tests: the real FATE clients (pyfate, eggroll) in their own venvs against fedgate."""
