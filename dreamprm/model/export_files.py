"""The files of an exported PRM: `dreamprm.model.loading` writes and reads them, Best-of-N checks
that a folder holds them. Named here, standard library only, so that checking a folder does not
import transformers."""

PRM_CONFIG = "prm_config.json"  # {"head": "logits" | "hidden", "aggregation": ..., domain weights, ...}
HEAD_FILE = "score_head.safetensors"
BACKBONE_WEIGHTS = "model.safetensors"  # what `export_prm` writes
BACKBONE_FILES = (BACKBONE_WEIGHTS, "model.safetensors.index.json")  # what a loadable folder may hold
