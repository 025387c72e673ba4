"""prompt_peft: visual-prompt PEFT methods for frozen Vision Transformers, for fine-grained image retrieval.

Importing the package registers its methods with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel`` and transformers' ``model.load_adapter`` all know them::

    import prompt_peft
    from peft import get_peft_model
    model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=10, num_classes=100))
"""

from .backbones import SUPPORTED_MODELS, BackboneSpec
from .loading import from_pretrained
from .methods import METHODS, build_peft_model, method_config
from .registry import register_method
from .tuners.frpt import FRPTConfig, FRPTModel
from .tuners.semantic_proxy import SemanticProxyVPTConfig, SemanticProxyVPTModel
from .tuners.ship import SHIPConfig, SHIPModel
from .tuners.vpt import VPTConfig, VPTModel

__version__ = "0.1.0"

for _config_cls, _model_cls in METHODS.values():
    register_method(_model_cls.prefix.removesuffix("_"), _config_cls, _model_cls)

__all__ = [
    "BackboneSpec",
    "FRPTConfig",
    "FRPTModel",
    "METHODS",
    "SHIPConfig",
    "SHIPModel",
    "SemanticProxyVPTConfig",
    "SemanticProxyVPTModel",
    "SUPPORTED_MODELS",
    "VPTConfig",
    "VPTModel",
    "build_peft_model",
    "from_pretrained",
    "method_config",
    "__version__",
]
