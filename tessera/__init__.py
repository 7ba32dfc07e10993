"""Tessera: NVMe-backed block volumes for Kubernetes.

This package holds what all three processes share: wire models, error
types, identifier rules and the HTTP client plumbing. The `tessera` CLI
lives here too.
"""

__version__ = "0.1.0"
