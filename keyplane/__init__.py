"""keyplane: the control plane for LLM provider keys.

This package holds what the control plane and the sidecar share: domain
types, errors, secret handling and the generated stubs (``keyplane.v1``).
"""

__version__ = "0.1.0"
