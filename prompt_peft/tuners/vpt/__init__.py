from .config import VPTConfig
from .model import VPTModel

__all__ = ["VPTConfig", "VPTModel"]
