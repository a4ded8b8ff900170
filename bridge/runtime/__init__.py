"""Engines that serve one batch on one model: the eager reference (engine.py) and the static-shape fast path."""
