"""Access control: optional bearer tokens, the dashboard's login cookie, CORS and the public-bind guard.

Two optional tokens (settings ``api_token`` and ``read_token``, i.e. ``GRADDIAG_API_TOKEN`` and
``GRADDIAG_READ_TOKEN``):

* a write (any method but GET and HEAD) needs ``Authorization: Bearer <api_token>`` when api_token is
  set; with only read_token set, writes need that token (never less than a read);
* a read (GET, HEAD) needs read_token or api_token when read_token is set, and is open otherwise.

One ASGI middleware classifies every request by method before any route, router or mounted app runs, so
a router added later (or static files) cannot be left unprotected. Only ``/healthz`` (liveness probes
carry no credentials) and ``/login`` (it checks the token itself) are open. A browser cannot send a
header on a page load, so reads also accept a ``?token=`` query parameter; a valid one sets the
``graddiag_token`` cookie (HttpOnly, SameSite=Strict) so the page's own API calls and event streams are
authorised too, and ``/login?token=…`` does the same and redirects to the dashboard. The cookie holds
an HMAC of the token, never the token itself, so no response ever carries a secret. Browser credentials
never authorise a write, so no other site can make a browser write (no CSRF). Tokens are compared in
constant time; a missing or wrong one gets a 401 problem with ``WWW-Authenticate: Bearer`` and no data.
The query token is redacted from uvicorn's log lines.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Annotated, Final, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse, Response
from pydantic import SecretStr
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graddiag.service.api.errors import problem_response
from graddiag.service.settings import Settings

TOKEN_COOKIE: Final = "graddiag_token"
TOKEN_QUERY: Final = "token"
OPEN_PATHS: Final = frozenset({"/healthz", "/login"})
READ_METHODS: Final = frozenset({"GET", "HEAD"})
# WebSocket close code "policy violation": the handshake had no valid token.
WS_POLICY_VIOLATION: Final = 1008

Access = Literal["read", "write"]

router = APIRouter(include_in_schema=False)


class InsecureBind(ValueError):
    """`serve` was asked to listen beyond this machine with no token guarding writes."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def check_bind(settings: Settings) -> None:
    """Raise InsecureBind when `settings` would expose a writable API beyond loopback."""
    if is_loopback(settings.host) or settings.api_token is not None or settings.allow_public_without_token:
        return
    raise InsecureBind(
        f"refusing to listen on {settings.host!r} with no API token: anyone who can reach it could submit "
        "and delete runs. Set GRADDIAG_API_TOKEN (and GRADDIAG_READ_TOKEN to guard reads), bind 127.0.0.1, "
        "or pass --allow-public-without-token."
    )


def _secret(value: SecretStr | None) -> bytes | None:
    return value.get_secret_value().encode() if value is not None else None


def cookie_value(token: bytes) -> str:
    """What the login cookie holds for `token`: a keyed hash, so the cookie never reveals the token."""
    return hmac.new(token, b"graddiag login cookie", hashlib.sha256).hexdigest()


def _matches(presented: Sequence[str], accepted: Sequence[bytes]) -> bool:
    granted = False
    for candidate in presented:
        for expected in accepted:
            # Every pair is compared, in constant time: how long it takes says nothing about which token
            # (or how much of one) matched.
            granted |= hmac.compare_digest(candidate.encode(), expected)
    return granted


class Tokens:
    """The tokens each kind of access accepts; an empty list means that access is open."""

    def __init__(self, api_token: SecretStr | None, read_token: SecretStr | None) -> None:
        write, read = _secret(api_token), _secret(read_token)
        self.write: list[bytes] = [write] if write is not None else [read] if read is not None else []
        self.read: list[bytes] = [t for t in (read, write) if t is not None] if read is not None else []
        self.read_cookies = [cookie_value(token).encode() for token in self.read]

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        """The tokens `settings` configure."""
        return cls(settings.api_token, settings.read_token)

    def accepted(self, access: Access) -> list[bytes]:
        """The tokens that grant `access`."""
        return self.write if access == "write" else self.read

    def grants(self, presented: Sequence[str], access: Access) -> bool:
        """Whether any presented token grants `access` (always, when that access is open)."""
        accepted = self.accepted(access)
        return not accepted or _matches(presented, accepted)

    def cookie_grants_read(self, cookie: str | None) -> bool:
        """Whether a login cookie grants reads."""
        return cookie is not None and _matches([cookie], self.read_cookies)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def set_token_cookie(headers: MutableHeaders, token: str, *, secure: bool) -> None:
    """Append the Set-Cookie that authorises the browser's later reads (it holds cookie_value(token))."""
    attributes = f"; Path=/; HttpOnly; SameSite=Strict{'; Secure' if secure else ''}"
    headers.append("set-cookie", f"{TOKEN_COOKIE}={cookie_value(token.encode())}{attributes}")


def unauthorized_detail(access: Access, *, presented: bool) -> str:
    """What a 401 tells the client (never the token it sent)."""
    what = "a valid token" if presented else "a token"
    browsers = " (browsers: open /login?token=<token> once)" if access == "read" else ""
    return f"This {access} needs {what}: send 'Authorization: Bearer <token>'{browsers}."


def _without_query_token(scope: Scope) -> Scope:
    """The scope minus `?token=`: routes never see the secret (and their query models forbid unknown keys)."""
    kept = [(k, v) for k, v in parse_qsl(scope["query_string"].decode("latin-1"), True) if k != TOKEN_QUERY]
    return {**scope, "query_string": urlencode(kept).encode("latin-1")}


class AccessControl:
    """ASGI middleware enforcing `tokens` on every HTTP request and WebSocket handshake."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        access: Access = "read" if scope["type"] == "websocket" or scope["method"] in READ_METHODS else "write"
        if not self.tokens.accepted(access):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        header = bearer(connection.headers.get("authorization"))
        # A browser cannot send a header on a page load: reads also take the token from the query.
        query = connection.query_params.get(TOKEN_QUERY) if access == "read" else None
        presented = [token for token in (header, query) if token]
        cookie = connection.cookies.get(TOKEN_COOKIE) if access == "read" else None
        if self.tokens.grants(presented, access) or self.tokens.cookie_grants_read(cookie):
            if query:
                if scope["type"] == "http" and self.tokens.grants([query], access):
                    send = self._remembering(send, query, secure=connection.url.scheme == "https")
                scope = _without_query_token(scope)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        await unauthorized_response(Request(scope), access, presented=bool(presented))(scope, receive, send)

    @staticmethod
    def _remembering(send: Send, token: str, *, secure: bool) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                set_token_cookie(MutableHeaders(scope=message), token, secure=secure)
            await send(message)

        return wrapped


def unauthorized_response(request: Request, access: Access, *, presented: bool) -> Response:
    """The 401 problem for a request without a token granting `access`, with its challenge header."""
    return problem_response(
        request,
        401,
        "unauthorized",
        unauthorized_detail(access, presented=presented),
        headers={"WWW-Authenticate": 'Bearer realm="graddiag"' + (', error="invalid_token"' if presented else "")},
    )


@router.get("/login")
def login(
    request: Request, token: Annotated[str, Query(min_length=1, max_length=1000, description="A read or API token.")]
) -> Response:
    """Check `token`, keep it in an HttpOnly cookie and go to the dashboard (401 when it grants nothing)."""
    tokens: Tokens = request.app.state.tokens
    if not tokens.grants([token], "read"):
        return unauthorized_response(request, "read", presented=True)
    # Behind a reverse proxy the dashboard lives under the proxy's prefix (root_path).
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/", status_code=303)
    set_token_cookie(response.headers, token, secure=request.url.scheme == "https")
    return response


# uvicorn's access log prints the request line, query string included, still percent-encoded. A query
# parameter is `key=value` after `?` or `&`; its key is judged decoded, as the app reads it, so
# `?to%6Ben=…` (which authenticates: the app decodes it to `token`) is redacted too.
_QUERY_PARAMETER = re.compile(r"(?<=[?&])([^=&#\s\"]*)=([^&#\s\"]*)")
REDACTED: Final = "***"


def _is_token_key(key: str) -> bool:
    # Decoded until stable (a doubly encoded key is redacted too; that costs nothing) and compared loosely.
    for _ in range(3):
        decoded = unquote_plus(key)
        if decoded == key:
            break
        key = decoded
    return key.strip().casefold() == TOKEN_QUERY


def redact_query_tokens(text: str) -> str:
    """`text` with the value of every query parameter whose decoded key is `token` replaced by ***."""
    if "=" not in text:
        return text

    def redact(match: re.Match[str]) -> str:
        key = match.group(1)
        return f"{key}={REDACTED}" if _is_token_key(key) else match.group(0)

    return _QUERY_PARAMETER.sub(redact, text)


class RedactTokens(logging.Filter):
    """A log filter replacing the value of a `?token=` query parameter (its key decoded) with ``***``.

    The redaction is applied to the record's message and to each of its string arguments, leaving the
    arguments a tuple of the same length: uvicorn's access formatter unpacks exactly five of them, so
    merging them into the message (``args = None``) would break every line that carried a token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query_tokens(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query_tokens(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query_tokens(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def redact_server_logs(loggers: Sequence[str] = ("uvicorn.access", "uvicorn.error")) -> None:
    """Install RedactTokens on uvicorn's loggers (serve() calls it before the server starts)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def install_access_control(app: FastAPI, settings: Settings) -> None:
    """Add the token check and, when `settings.cors_origins` lists origins, CORS outside it.

    Call after every other middleware: the last added runs first, so CORS answers a preflight (which
    carries no credentials) before the token check, and the token check runs before the body is read.
    """
    tokens = Tokens.from_settings(settings)
    app.state.tokens = tokens
    app.add_middleware(AccessControl, tokens=tokens)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        )
