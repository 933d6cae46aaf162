"""Who may do what: API keys for scoring, an admin token for control (reload).

- **Control** (reloading the model over HTTP) is off unless an admin token is configured
  (``--admin-token-file``, or the ``PATCHCORE_ADMIN_TOKEN`` environment variable); then it
  needs ``Authorization: Bearer <token>``. SIGHUP, which only the machine's users can send,
  reloads in any case.
- **Scoring** is open unless API keys are configured (``--api-key-file``: one ``name key`` pair
  a line); then scoring and the model's metadata need ``Authorization: Bearer <key>``, and the
  key's name is who asked (``request.state.client``). Health, readiness and the page stay open,
  so that orchestrators and a browser can reach them.

Secrets are compared in constant time over their whole length (:func:`hmac.compare_digest`),
every key every time, so that neither a prefix nor which key nearly matched can be timed.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from ..errors import BadInputError

#: environment variable that may hold the admin token instead of a file
ADMIN_TOKEN_VARIABLE = "PATCHCORE_ADMIN_TOKEN"
#: shortest secret accepted: 128 bits as hex (``openssl rand -hex 16``)
MIN_SECRET_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_SECRET = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what fits in a header


@dataclass(frozen=True)
class AccessRules:
    """The server's credentials: ``admin_token`` (None: no reload over HTTP) and ``api_keys``
    ({name: key}; empty: scoring is open)."""

    admin_token: str | None = None
    api_keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_files(cls, admin_token_file: str | Path | None = None, api_key_file: str | Path | None = None) -> "AccessRules":
        """Read the token and the keys; a bad file is one line naming it and the cause."""
        token = None
        if admin_token_file is not None:
            token = _read_secret_file(Path(admin_token_file))
        elif os.environ.get(ADMIN_TOKEN_VARIABLE):
            token = _check_secret(os.environ[ADMIN_TOKEN_VARIABLE].strip(), f"${ADMIN_TOKEN_VARIABLE}")
        keys = _read_key_file(Path(api_key_file)) if api_key_file is not None else {}
        return cls(token, keys)

    def client(self, request: Request) -> str | None:
        """The name of the API key the request carries; None when keys are off. Raises 401 when
        keys are on and the request has none, or one that is not among them."""
        if not self.api_keys:
            return None
        offered = _bearer(request)
        found = None
        for name, key in self.api_keys.items():  # every key, every time: no early exit to time
            if _same(offered, key):
                found = name
        if found is None:
            detail = "this server needs an API key: send 'Authorization: Bearer <key>'" if offered is None else "unknown API key"
            raise HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="patchcore"'})
        return found

    def check_admin(self, request: Request) -> None:
        """Raise 403 when control over HTTP is off, 401 when the request lacks the admin token."""
        if self.admin_token is None:
            raise HTTPException(
                403, f"reloading over HTTP is off: start the server with --admin-token-file (or ${ADMIN_TOKEN_VARIABLE}) to allow it, or send the server SIGHUP"
            )
        if not _same(_bearer(request), self.admin_token):
            raise HTTPException(401, "reloading needs the admin token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": 'Bearer realm="patchcore-admin"'})


def _same(offered: str | None, secret: str) -> bool:
    """Constant-time equality over the whole secret (an absent one never matches)."""
    return offered is not None and hmac.compare_digest(offered.encode(), secret.encode())


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def require_api_key(request: Request) -> str | None:
    """FastAPI dependency of the scoring routes: the caller's key name (None when keys are off).
    (Async: FastAPI would run a plain function on a worker thread, a hop per request for nothing.)"""
    client = request.app.state.access.client(request)
    request.state.client = client
    return client


async def require_admin(request: Request) -> None:
    """FastAPI dependency of the control routes."""
    request.app.state.access.check_admin(request)


def _read_secret_file(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"'{path}': cannot read the admin token ({error.__class__.__name__}: {error})") from None
    return _check_secret(text, f"'{path}'")


def _check_secret(secret: str, where: str) -> str:
    if len(secret) < MIN_SECRET_LENGTH or not _SECRET.match(secret):
        raise BadInputError(f"{where}: a token must be at least {MIN_SECRET_LENGTH} printable characters without spaces (e.g. openssl rand -hex 16)")
    return secret


def _read_key_file(path: Path) -> dict[str, str]:
    """``name key`` a line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"'{path}': cannot read the API keys ({error.__class__.__name__}: {error})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 2 or not _NAME.match(parts[0]):
            raise BadInputError(f"'{path}', line {number}: expected 'NAME KEY' (a name of letters, digits, '.', '_', '@' or '-', then the key)")
        name, key = parts
        _check_secret(key, f"'{path}', line {number}")
        if name in keys:
            raise BadInputError(f"'{path}', line {number}: the name '{name}' is given twice")
        if key in keys.values():
            raise BadInputError(f"'{path}', line {number}: the key of '{name}' is another name's too")
        keys[name] = key
    if not keys:
        raise BadInputError(f"'{path}': no API keys in the file (one 'NAME KEY' a line)")
    return keys
