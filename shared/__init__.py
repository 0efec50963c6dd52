"""Shared library: wire schemas, images, perturbations, the tiny model and synthetic data."""
