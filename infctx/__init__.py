"""infctx: train RWKV-5/6/7 on sequences of any length with exact gradients through the carried state."""

__version__ = "0.1.0"
