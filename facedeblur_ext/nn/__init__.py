"""Layers built on the fused ops, for embedding in other PyTorch models."""

__all__: list[str] = []
