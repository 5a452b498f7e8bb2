"""Print pip constraints that pin every dependency of pyproject.toml (extras included) to its lower bound."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra, items in project["optional-dependencies"].items():
    if extra != "vllm":  # vLLM has its own environment
        requirements += [item for item in items if not item.startswith("trl-longreward")]
pins = {}
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", requirement)
    if match is None:
        sys.exit(f"no lower bound in {requirement!r}: every dependency needs one")
    pins[match.group(1).lower()] = match.group(3)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
