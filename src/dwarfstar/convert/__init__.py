"""Checkpoint conversion: Hugging Face / DeepSeek release checkpoints to GGUF."""

from .converter import OUTPUT_TYPES, Conversion, ConvertError, convert_checkpoint

__all__ = ["OUTPUT_TYPES", "Conversion", "ConvertError", "convert_checkpoint"]
