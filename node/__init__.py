"""Potluck node: serve a contiguous span of a model's transformer layers over gRPC."""
