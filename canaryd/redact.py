"""One redaction function for every text that leaves the process: logs, a Canary's
status, Kubernetes Events, API answers.

Credentials travel in URLs (``http://user:pass@prometheus:9090``, ``?token=…``) and
from there into error messages; whoever can read Canaries or logs must not see them.
:func:`redact` replaces the userinfo of every URL in a text and the values of query
parameters that carry secrets, and leaves everything else as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s'\"]+@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:access_token|token|api[_-]?key|apikey|password|passwd|secret|"
    r"client_secret|sig|signature)=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every URL's credentials replaced by ``***``."""
    if "@" not in text and "=" not in text:  # the common case: nothing to look for
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_tree(value: Any) -> Any:
    """Every string in a JSON-like tree (dicts, lists), redacted; a new tree."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: every value of the event, tracebacks included, redacted."""
    for key, value in event.items():
        if isinstance(value, str | Mapping | list | tuple):
            event[key] = redact_tree(value)
        elif isinstance(value, BaseException):
            event[key] = redact(str(value))
    return event
