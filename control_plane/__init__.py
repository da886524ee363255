"""The keyplane control plane: gRPC admin and sidecar services over a store."""
