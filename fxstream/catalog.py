"""Every table that names a diffusers class or a module path, in one place.

Nothing here decides a slice: the rules and the graph do (the axes are found from the ops alone,
fxstream/analysis/axes.py). These tables tell which block attribute holds a UNet's temporal layers (Step Rehash's
default cache point), which diffusers pipelines ``compile_pipeline`` can budget as a whole, and which UNet classes
the command line and the model builders make.
"""
from __future__ import annotations

__all__ = ["TEMPORAL_LAYERS", "UP_BLOCKS", "TIMESTEP_ARG", "DEFAULT_PROBE", "PIPELINE_KINDS", "UNET_KINDS",
           "UNET_CLASSES", "unet_kind"]

# The temporal layers of each diffusers block type: the attribute holding them. A module in one of these lists
# returns a feature that has just been mixed across frames (TransformerSpatioTemporalModel and
# SpatioTemporalResBlock end with their temporal part and its AlphaBlender; motion modules and temp_* are temporal).
TEMPORAL_LAYERS = {
    "CrossAttnDownBlockSpatioTemporal": "attentions",
    "DownBlockSpatioTemporal": "resnets",
    "UNetMidBlockSpatioTemporal": "attentions",
    "CrossAttnUpBlockSpatioTemporal": "attentions",
    "UpBlockSpatioTemporal": "resnets",
    "CrossAttnDownBlockMotion": "motion_modules",
    "DownBlockMotion": "motion_modules",
    "UNetMidBlockCrossAttnMotion": "motion_modules",
    "CrossAttnUpBlockMotion": "motion_modules",
    "UpBlockMotion": "motion_modules",
    "CrossAttnDownBlock3D": "temp_attentions",
    "DownBlock3D": "temp_convs",
    "UNetMidBlock3DCrossAttn": "temp_attentions",
    "CrossAttnUpBlock3D": "temp_attentions",
    "UpBlock3D": "temp_convs",
}
TIMESTEP_ARG = "timestep"  # the argument diffusers' UNets take the denoising timestep by (a number or a tensor)
UP_BLOCKS = "up_blocks"  # the attribute of a diffusers UNet holding its up blocks (the default cache point's)
DEFAULT_PROBE = "conv_in"  # the module whose output the adaptive Step Rehash schedule compares across steps

# The diffusers pipelines compile_pipeline budgets as a whole, by the kind of inputs fxstream makes for them.
PIPELINE_KINDS = {"StableVideoDiffusionPipeline": "svd", "AnimateDiffPipeline": "animatediff"}
# The UNet classes whose example inputs fxstream can make (the command line, pipelines), by kind.
UNET_KINDS = {"UNetSpatioTemporalConditionModel": "svd", "UNetMotionModel": "animatediff"}
# The diffusers class of each kind of UNet fxstream builds from a config (AnimateDiff's comes from a 2-D UNet and a
# motion adapter), and every class load_unet accepts.
UNET_CLASSES = {"svd": "UNetSpatioTemporalConditionModel", "animatediff": "UNetMotionModel",
                "unet3d": "UNet3DConditionModel", "i2vgenxl": "I2VGenXLUNet"}


def unet_kind(unet) -> str:
    """``"svd"`` or ``"animatediff"``: which example inputs fit this UNet; ValueError naming what is known."""
    name = type(unet).__name__
    if name == "UNet2DConditionModel":  # an AnimateDiff pipeline's UNet before the motion adapter joins it
        return "animatediff"
    if name not in UNET_KINDS:
        raise ValueError(f"unet: a {name}; expected a UNetSpatioTemporalConditionModel (SVD) or a UNetMotionModel "
                         "(AnimateDiff)")
    return UNET_KINDS[name]
