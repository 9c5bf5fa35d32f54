"""Baselines the gateway is measured against; each runs as its own process, like the gateway."""
