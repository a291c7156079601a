"""Resolve, provision and load base models."""
