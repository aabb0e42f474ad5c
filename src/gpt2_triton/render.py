"""A strict template renderer for ``config.pbtxt``: a missing or an unused key is an error.

``string.Template.safe_substitute`` would leave a forgotten ``${key}`` in the file for
Triton to trip over at load time; here it fails at build time, naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gpt2_triton.errors import Gpt2TritonError

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(Gpt2TritonError):
    pass


def render(template: str, values: Mapping[str, object], source: str = "template") -> str:
    wanted = set(_PLACEHOLDER.findall(template))
    missing = sorted(wanted - values.keys())
    unused = sorted(values.keys() - wanted)
    if missing:
        raise TemplateError(f"{source}: no value for {', '.join(missing)}")
    if unused:
        raise TemplateError(f"{source}: values not used by the template: {', '.join(unused)}")
    if "$" in _PLACEHOLDER.sub("", template):
        raise TemplateError(f"{source}: a '$' that is not a ${{key}} placeholder")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)
