"""Data-plane-neutral test cases for meshgate's plugins (run through Envoy and the sidecar)."""
