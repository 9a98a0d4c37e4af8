"""What the stage scripts share: flags, the loop and its objectives, the run folder, loading a model for use."""

from .chat import eval_stage
from .errors import UserError
from .loading import load_flagged, load_for_use
from .objectives import DirectPreference, Distillation, LanguageModeling, Loss, Objective, Step
from .stages import PRETRAIN_DEFAULTS, PRETRAIN_SHORT_PLAN, Stage, run_cli, train_stage

__all__ = ["eval_stage", "UserError", "load_flagged", "load_for_use", "DirectPreference", "Distillation",
           "LanguageModeling", "Loss", "Objective", "Step", "PRETRAIN_DEFAULTS", "PRETRAIN_SHORT_PLAN",
           "Stage", "run_cli", "train_stage"]
