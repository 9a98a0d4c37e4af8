"""What the stage scripts share: flags, the loop and its objectives, checkpoints, perplexity and chat."""

from .chat import eval_stage
from .checkpoint import load_model, load_model_as_flagged, save_weights
from .errors import UserError
from .objectives import DirectPreference, Distillation, LanguageModeling, Loss, Objective, Step
from .stages import Stage, run_cli, train_stage

__all__ = ["eval_stage", "load_model", "load_model_as_flagged", "save_weights", "UserError", "DirectPreference", "Distillation",
           "LanguageModeling", "Loss",
           "Objective", "Step", "Stage", "run_cli", "train_stage"]
