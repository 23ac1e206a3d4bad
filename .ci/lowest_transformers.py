"""Print the lowest transformers release the package declares (the ``>=`` bound in pyproject.toml)."""

import re
from pathlib import Path

text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
print(re.search(r'"transformers\s*>=\s*([\w.]+)', text).group(1))
