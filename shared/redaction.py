"""Keep API keys out of observations, stored errors and log records.

Every configured secret value is replaced by ``***`` wherever it appears: as is, as it
looks inside a JSON string, and URL-encoded (a server echoing a request back may use
either form).

Usage::

    redact = Redactor([settings.tools_rapidapi_key])
    redact("key=sk-123")          # 'key=***'
    log_redacted(logger, logging.INFO, redact, "calling %s", url)
    install_log_redaction(redact)  # also mask records of httpx/httpcore (URLs may echo arguments)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit

from pydantic import SecretStr

__all__ = [
    "ERROR_TEXT_LIMIT",
    "MASK",
    "RedactingFilter",
    "Redactor",
    "bound_text",
    "install_log_redaction",
    "log_redacted",
    "secrets_redactor",
]

MASK = "***"
#: The most characters of an error text (from SGLang, a tool, an exception) that is stored,
#: returned or logged; the rest is cut, so a server that answers with megabytes cannot fill rows.
ERROR_TEXT_LIMIT = 4096


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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Redactor) and other._forms == self._forms

    def __hash__(self) -> int:
        return hash(self._forms)

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
    forms.update({quote(value, safe=""), quote(value), quote_plus(value, safe="")})
    return {form for form in forms if form}


def log_redacted(logger: logging.Logger, level: int, redact: Redactor, message: str, *args: object) -> None:
    """Log ``message % args`` with secrets masked (formatting happens here, not in handlers)."""
    if not logger.isEnabledFor(level):
        return
    text = message % args if args else message
    logger.log(level, "%s", redact(text), stacklevel=2)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the formatted message of every record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self._redactors: list[Redactor] = []

    def add(self, redactor: Redactor) -> None:
        """Also mask the secrets of ``redactor``."""
        if redactor and redactor not in self._redactors:
            self._redactors.append(redactor)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._redactors:
            return True
        message = record.getMessage()
        masked = message
        for redact in self._redactors:
            masked = redact(masked)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_FILTER = RedactingFilter()
#: Loggers whose records may carry tool arguments (httpx logs each request URL at INFO).
#: A logger's filters do not apply to its children's records, so each is named.
REDACTED_LOGGERS = (
    "services.tools",
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
)


def install_log_redaction(redactor: Redactor) -> None:
    """Mask ``redactor``'s secrets in records of :data:`REDACTED_LOGGERS` (idempotent)."""
    _FILTER.add(redactor)
    for name in REDACTED_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


def bound_text(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"… [{len(text) - limit} more characters cut]"
    return text[: max(0, limit - len(note))] + note


def secrets_redactor(settings: object) -> Redactor:
    """A redactor for every secret in the settings.

    Each ``SecretStr`` field (e.g. ``UMI_LLM_API_KEY``), and the password of every URL
    setting that carries one (``UMI_DATABASE_URL``, an ``UMI_*_LLM_URL`` behind basic
    auth, …), since error texts and logs quote URLs.
    """
    values: list[str | SecretStr | None] = []
    for value in vars(settings).values():
        if isinstance(value, SecretStr):
            values.append(value)
        elif isinstance(value, str) and "://" in value:
            try:
                values.append(urlsplit(value).password)
            except ValueError:  # not a URL after all
                continue
    return Redactor(values)
