"""Label Studio integration: an ML backend (backend.py) that pre-marks unlikely tokens
(predict.py) and turns saved spans into trainer annotations with the shared conversion
(tokenfeedback.imports), and the labeling config it ships with (config.py)."""

from tokenfeedback.labelstudio import commands  # noqa: E402,F401 - registers the CLI commands
from tokenfeedback.labelstudio.config import LABEL_CONFIG, NAMES, LabelNames, label_config

__all__ = ["LABEL_CONFIG", "NAMES", "LabelNames", "label_config"]
