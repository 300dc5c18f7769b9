"""Adapters between a training setup and the core: where this rank's gradients live, how to read
each pass's reduced gradient, write the final one and step. A backend never computes a score."""
