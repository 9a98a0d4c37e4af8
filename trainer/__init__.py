"""What the stage scripts share: flags, the training loop, checkpoints, perplexity and chat."""

from .chat import eval_stage
from .checkpoint import load_model, save_weights
from .errors import UserError
from .stages import run_cli, train_stage

__all__ = ["eval_stage", "load_model", "save_weights", "UserError", "run_cli", "train_stage"]
