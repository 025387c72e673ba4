"""prompt_peft: visual-prompt PEFT methods for frozen Vision Transformers (image retrieval)."""

__version__ = "0.1.0"
