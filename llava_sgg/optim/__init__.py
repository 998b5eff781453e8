"""Optimizers: SGG and its base optimizers. Imports nothing from the rest of llava_sgg."""

from .factory import OPTIMIZER_NAMES, build_optimizer, check_optimizer_options, param_groups_weight_decay
from .lamb import Lamb
from .sgg import SGG

__all__ = ["OPTIMIZER_NAMES", "SGG", "Lamb", "build_optimizer", "check_optimizer_options", "param_groups_weight_decay"]
