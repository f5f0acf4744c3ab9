"""Vision Mamba / ShuffleMamba models. Importing this module registers them in timm."""

from .checkpoint import load_checkpoint, prepare_state_dict, resize_pos_embed
from .mamba_mixer import BiMambaMixer, RMSNorm, VimBlock
from .vim import CLS_POSITIONS, PatchEmbed, VisionMamba
from .vim_reg import VisionMambaReg, register_positions

MODEL_NAMES = (
    "vim_tiny_patch16_224",
    "vim_small_patch16_224",
    "vim_base_patch16_224",
    "shufflemamba_middle_patch16_224",
    "shufflemamba_base_patch16_224",
    "shufflemamba_large_patch16_224",
    "mambar_tiny_patch16_224",
    "mambar_small_patch16_224",
    "mambar_base_patch16_224",
    "mambar_large_patch16_224",
)

__all__ = [
    "BiMambaMixer", "CLS_POSITIONS", "MODEL_NAMES", "PatchEmbed", "RMSNorm", "VimBlock", "VisionMamba",
    "VisionMambaReg", "register_positions",
    "load_checkpoint", "prepare_state_dict", "resize_pos_embed",
]
