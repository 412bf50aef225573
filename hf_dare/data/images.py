"""The images of LLaVA-format samples, loaded alike for training (`LlavaDataCollator`) and evaluation."""

import os
from typing import Any


def load_image(image: Any):
    """An RGB `PIL.Image` from a path; anything else (an image already loaded) is returned as it is."""
    from PIL import Image

    return Image.open(image).convert("RGB") if isinstance(image, (str, os.PathLike)) else image
