"""Tessera's own CSI conformance suite (see sanity/conftest.py)."""
