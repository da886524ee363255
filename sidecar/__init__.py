"""The keyplane sidecar: an OpenAI-compatible HTTP proxy on loopback."""
