"""prompt_peft: visual-prompt PEFT methods for frozen Vision Transformers, for fine-grained image retrieval.

Importing the package registers its methods with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel`` and transformers' ``model.load_adapter`` all know them::

    import prompt_peft
    from peft import get_peft_model
    model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=10, num_classes=100))
"""

from .backbones import SUPPORTED_MODELS, BackboneSpec
from .loading import from_pretrained
from .registry import register_method
from .tuners.frpt import FRPTConfig, FRPTModel
from .tuners.ship import SHIPConfig, SHIPModel
from .tuners.vpt import VPTConfig, VPTModel

__version__ = "0.1.0"

# method name -> (config, tuner); registration makes them real peft methods (PeftType.VPT, ...)
METHODS = {"vpt": (VPTConfig, VPTModel), "ship": (SHIPConfig, SHIPModel), "frpt": (FRPTConfig, FRPTModel)}
for _name, (_config_cls, _model_cls) in METHODS.items():
    register_method(_name, _config_cls, _model_cls)

__all__ = [
    "BackboneSpec",
    "FRPTConfig",
    "FRPTModel",
    "METHODS",
    "SHIPConfig",
    "SHIPModel",
    "SUPPORTED_MODELS",
    "VPTConfig",
    "VPTModel",
    "from_pretrained",
    "__version__",
]
