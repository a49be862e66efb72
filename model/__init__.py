"""ssmstream.model — SSM math, layers, network, data, training and checkpoints (torch).

from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint, load_checkpoint
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .layers import SSM
from .network import SSMConfig, SSMNetwork

__all__ = [
    "SSM",
    "SSMConfig",
    "SSMNetwork",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
]
