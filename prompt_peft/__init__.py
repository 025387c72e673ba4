"""prompt_peft: visual-prompt PEFT methods for frozen Vision Transformers, for fine-grained image retrieval.

Importing the package registers its methods with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel`` and transformers' ``model.load_adapter`` all know them::

    import prompt_peft
    from peft import get_peft_model
    model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=10, num_classes=100))
"""

from .backbones import SUPPORTED_MODELS, BackboneSpec
from .hub_checks import install as _install_push_explanation
from .loading import from_pretrained, image_transform
from .methods import METHODS, build_peft_model, method_config
from .registry import register_method
from .strict_loading import AdapterMismatchError
from .strict_loading import install as _install_strict_loading
from .tuners.frpt import FRPTConfig, FRPTModel
from .tuners.semantic_proxy import SemanticProxyVPTConfig, SemanticProxyVPTModel
from .tuners.ship import SHIPConfig, SHIPModel
from .tuners.vpt import VPTConfig, VPTModel

__version__ = "0.1.0"

for _config_cls, _model_cls in METHODS.values():
    register_method(_model_cls.prefix.removesuffix("_"), _config_cls, _model_cls)
_install_strict_loading()  # transformers' load_adapter: strict for prompt_peft adapters
_install_push_explanation()  # PeftModel.push_to_hub: a lost connection explained

__all__ = [
    "AdapterMismatchError",
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
    "image_transform",
    "method_config",
    "__version__",
]
