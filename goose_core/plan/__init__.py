"""goose plan: each rank's bytes, FLOPs and traffic predicted from a config and a layout.

Read ``predictor`` first (the meta-device model on a fake process group) and ``pipeline_share``
(a pipeline rank's chunks, activation peak and pp traffic), then ``hardware`` (step
time, MFU), ``cli`` (the command) and ``accuracy`` (the prediction beside a measured step).
"""

from goose_core.plan.hardware import PRESETS, Hardware, mfu, step_time
from goose_core.plan.predictor import Layout, RankPlan, model_config, predict

__all__ = ["Hardware", "Layout", "PRESETS", "RankPlan", "mfu", "model_config", "predict", "step_time"]
