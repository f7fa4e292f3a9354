"""workbench: reproducible ablations of the "Let's build GPT" ladder, tracked in MLflow.

The package root stays light: importing it must not import torch or mlflow.
"""

__version__ = "0.1.0"
