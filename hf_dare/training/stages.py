"""MoE-LLaVA's three training stages as presets: what is trained (parameter-name patterns) and the
paper's default hyper-parameters.

- stage1: projector only, on image-caption pairs (LLaVA-PT 558k; dense LLaVA);
- stage2: LLM + projector, on multimodal instruction data (SViT, LVIS, LRV, MIMIC-IT; dense LLaVA);
- stage3: the upcycled MoE model (`hf-dare upcycle`), everything but the vision tower, on LLaVA-mix-665k.
"""

import re
from dataclasses import dataclass

from torch import nn

from hf_dare.errors import InputError

from .trainer import MoETrainingArguments

PROJECTOR = r"(^|\.)multi_modal_projector\."
LANGUAGE_MODEL = r"(^|\.)language_model\."
LM_HEAD = r"(^|\.)lm_head\."


@dataclass(frozen=True)
class TrainingStage:
    """A training stage: `trainable` regexes are searched in `named_parameters()` names; the rest are frozen.
    The hyper-parameters are the paper's (global batch = devices x per-device batch x accumulation)."""

    name: str
    description: str
    trainable: tuple[str, ...]
    learning_rate: float
    predictor_learning_rate: float | None = None
    global_batch_size: int = 128
    num_train_epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"

    def training_arguments(self, output_dir: str, **overrides) -> MoETrainingArguments:
        """`MoETrainingArguments` with this stage's defaults; `overrides` win (e.g. `max_steps`, `report_to`)."""
        kwargs = dict(
            output_dir=output_dir,
            learning_rate=self.learning_rate,
            predictor_learning_rate=self.predictor_learning_rate,
            num_train_epochs=self.num_train_epochs,
            warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            remove_unused_columns=False,  # the collator needs the raw `conversations` / `images`
            prediction_loss_only=True,
        )
        kwargs.update(overrides)
        return MoETrainingArguments(**kwargs)


STAGES = {
    "stage1": TrainingStage(
        "stage1",
        "projector only (dense LLaVA, image-caption pairs: LLaVA-PT 558k)",
        (PROJECTOR,),
        1e-3,
        global_batch_size=256,
    ),
    "stage2": TrainingStage(
        "stage2",
        "LLM + projector (dense LLaVA, multimodal instruction data: SViT, LVIS, LRV, MIMIC-IT)",
        (PROJECTOR, LANGUAGE_MODEL, LM_HEAD),
        2e-5,
    ),
    "stage3": TrainingStage(
        "stage3",
        "MoE model: everything but the vision tower, on LLaVA-mix-665k (DARE predictors at their own learning rate)",
        (PROJECTOR, LANGUAGE_MODEL, LM_HEAD),
        2e-5,
        predictor_learning_rate=1e-4,
    ),
}


def get_stage(stage: str | TrainingStage) -> TrainingStage:
    if isinstance(stage, TrainingStage):
        return stage
    if stage not in STAGES:
        raise InputError(f"Unknown training stage {stage!r}; expected one of {sorted(STAGES)} or a TrainingStage.")
    return STAGES[stage]


def apply_stage(model: nn.Module, stage: str | TrainingStage) -> list[str]:
    """Freeze every parameter of `model` except those whose name matches one of the stage's patterns.
    Returns the names of the trainable parameters; raises ValueError when no name matches."""
    stage = get_stage(stage)
    patterns = [re.compile(pattern) for pattern in stage.trainable]
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(pattern.search(name) for pattern in patterns))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise InputError(
            f"{stage.name}: no parameter of {type(model).__name__} matches {list(stage.trainable)} "
            "(the stages expect LLaVA's layout: model.vision_tower / model.multi_modal_projector / "
            "model.language_model / lm_head)."
        )
    return trainable
