"""Adaptation methods, one module each; importing one registers it."""
