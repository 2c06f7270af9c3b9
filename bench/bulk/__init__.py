"""Bulk extraction with Ray Data: images/s against the actor pool's size."""
