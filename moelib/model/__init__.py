"""The network. It holds the math only; parallelism wraps it from outside."""

from moelib.model.transformer import LossOutput, Transformer, build_model

__all__ = ["Transformer", "LossOutput", "build_model"]
