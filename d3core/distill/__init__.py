"""Distillation pieces (pure tensors): trajectory masking, losses, curricula."""
