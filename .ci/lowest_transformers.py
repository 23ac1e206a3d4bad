"""Print the lowest transformers release the package declares (the ``>=`` bound in pyproject.toml)."""

import re
import tomllib
from pathlib import Path

deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\b", d))
print(re.search(r">=\s*([\w.]+)", spec).group(1))
