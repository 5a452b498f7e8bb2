"""Small data sets shipped with the package (see README.md in this folder for sources and licences)."""

from importlib import resources
from pathlib import Path


def demo_score_path() -> Path:
    """JSONL of (context, question, response) rows for trying `trl-longreward score`."""
    return Path(str(resources.files("trl_longreward.data").joinpath("demo_score.jsonl")))
