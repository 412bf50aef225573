"""Conversions into hf-dare checkpoints, as plans executed tensor by tensor (mergekit style).

- `upcycle`: a dense causal LM or dense transformers LLaVA -> an MoE checkpoint (experts = copies of the FFN).
- `build_llava`: a causal LM + a CLIP / SigLIP vision model -> a dense transformers LLaVA (stage-1 start).
- `import_moellava`: an original (DeepSpeed) MoE-LLaVA checkpoint -> an hf-dare MoE-LLaVA with the top-k router.

Every conversion writes into a temporary folder beside the output and moves it into place only when
complete; failures raise `ConversionError` and leave nothing behind.
"""

from .build import build_llava
from .checkpoint import CheckpointReader, ConversionError, resolve_source
from .moellava import import_moellava, moellava_plan
from .plan import PlannedTensor, check_plan
from .upcycle import upcycle, upcycle_plan
from .writer import parse_size, staged_output, write_plan

__all__ = [
    "CheckpointReader",
    "ConversionError",
    "PlannedTensor",
    "build_llava",
    "check_plan",
    "import_moellava",
    "moellava_plan",
    "parse_size",
    "resolve_source",
    "staged_output",
    "upcycle",
    "upcycle_plan",
    "write_plan",
]
