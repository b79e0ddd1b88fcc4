"""RWKV-5/6/7 models with explicit recurrent state; parameter names are RWKV-LM's .pth keys."""

from infctx.model.config import ModelConfig
from infctx.model.rwkv import RWKV, Block
from infctx.model.state import State

__all__ = ["RWKV", "Block", "ModelConfig", "State"]
