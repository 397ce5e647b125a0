"""Checkpoints: open (reader), decode every format (formats), validate scales (validate), write atomically
(writer), convert between formats (convert.convert) and summarise (info.describe). Names: names.py."""
from megamoe_jax.checkpoint.info import CheckpointInfo, describe
from megamoe_jax.checkpoint.reader import CheckpointError, CheckpointFiles, open_checkpoint
from megamoe_jax.checkpoint.validate import ScaleError, ScaleReport, scale_report

__all__ = ["describe", "CheckpointInfo", "open_checkpoint", "CheckpointFiles", "CheckpointError",
           "ScaleError", "ScaleReport", "scale_report"]
