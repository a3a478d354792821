"""Keep API keys out of observations, stored errors and log records.

Every configured secret value is replaced by ``***`` wherever it appears: as is, as it
looks inside a JSON string, and URL-encoded (a server echoing a request back may use
either form).

Usage::

    redact = Redactor([settings.tools_rapidapi_key])
    redact("key=sk-123")          # 'key=***'
    log_redacted(logger, logging.INFO, redact, "calling %s", url)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

__all__ = ["MASK", "Redactor", "log_redacted"]

MASK = "***"


class Redactor:
    """Replaces each known secret value (and its JSON/URL-encoded forms) with ``***``."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if value:
                forms.update(_encoded_forms(value))
        # Longest first, so a secret that contains another is masked whole.
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __repr__(self) -> str:
        return f"Redactor({len(self._forms)} forms)"

    def __call__(self, text: str) -> str:
        """``text`` with every secret masked."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text


def _encoded_forms(value: str) -> set[str]:
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    forms.update({quote(value, safe=""), quote_plus(value, safe="")})
    return {form for form in forms if form}


def log_redacted(logger: logging.Logger, level: int, redact: Redactor, message: str, *args: object) -> None:
    """Log ``message % args`` with secrets masked (formatting happens here, not in handlers)."""
    if not logger.isEnabledFor(level):
        return
    text = message % args if args else message
    logger.log(level, "%s", redact(text))
