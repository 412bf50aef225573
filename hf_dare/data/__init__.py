"""Data loading shared by training, evaluation, calibration and the lmms-eval model: LLaVA-format conversations
(`load_llava_dataset`, `LlavaDataCollator`), their images (`load_image`) and calibration data
(`calibration_batches`)."""

from .calibration import calibration_batches
from .images import load_image
from .llava import IGNORE_INDEX, IMAGE_PLACEHOLDER, LlavaDataCollator, conversation_to_messages, load_llava_dataset

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "LlavaDataCollator",
    "calibration_batches",
    "conversation_to_messages",
    "load_image",
    "load_llava_dataset",
]
