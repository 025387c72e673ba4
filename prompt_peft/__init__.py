"""prompt_peft: visual-prompt PEFT methods for frozen Vision Transformers, for fine-grained image retrieval.

Importing the package registers its methods with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel`` and transformers' ``model.load_adapter`` all know them::

    import prompt_peft
    from peft import get_peft_model
    model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=10, num_classes=100))
"""

from .backbones import BackboneSpec
from .registry import register_method
from .tuners.vpt import VPTConfig, VPTModel

__version__ = "0.1.0"

register_method("vpt", VPTConfig, VPTModel)

__all__ = ["BackboneSpec", "VPTConfig", "VPTModel", "__version__"]
