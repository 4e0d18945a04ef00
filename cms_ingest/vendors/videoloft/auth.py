"""The account's session: login, token renewal, and the authenticated GET every other part
of the client uses.

`POST {authenticator}/login` with `{email, password}`; a `{location}` answer means "log in at
that regional authenticator". Tokens live 20 minutes and carry their issue time and lifetime
(`base64("uid:issued:ttl:...")*signature`): we renew at 3/4 of the lifetime with the login
cookie (`caller=cookielogin`), and log in with the password when that fails. One renewal at
a time. The token goes where the manual puts it, route by route: the `Authorization:
ManythingToken` header (authenticator, `/cameras/status`, realtime), the `token=` query
(`/alert`, `/sendcameratask`, the MP4), the path (thumbnails). Hosts handed back are
contacted with the site URL's scheme.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from cms_ingest.sitehttp import SiteHttp, TransportError
from cms_ingest.vendors.base import AuthenticationFailed, BadDeviceResponse, VendorContext
from cms_ingest.vendors.common import as_id, error_text, read_json
from cms_ingest.vendors.videoloft.answers import _result
from cms_ingest.vendors.videoloft.options import VideoloftOptions

Params = Mapping[str, str] | Sequence[tuple[str, str]]

DEFAULT_TOKEN_TTL_S = 1200.0
RENEW_AT = 0.75  # of the token's lifetime: 15 of 20 minutes
# accountInfo.maxAge is a storage plan in days; anything past a century is not a plan.
MAX_AGE_DAYS = 36_500


@dataclass(slots=True)
class _Token:
    value: str | None = None
    renew_at: float = 0.0  # epoch
    cookie: str | None = None


class VideoloftSession:
    """The first layer of `VideoloftClient`: what it is built with, and its session."""

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        self.site_id = context.site_id
        self._http = context.http  # the configured (global or regional) authenticator
        self._auth_http = context.http
        self._email = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._token = _Token()
        self._token_lock = asyncio.Lock()
        self._max_age_ms: int | None = None
        self._hosts: dict[str, SiteHttp] = {}

    async def _auth_token(self) -> str:
        if self._token.value is not None and time.time() < self._token.renew_at:
            return self._token.value
        async with self._token_lock:  # one renewal at a time
            if self._token.value is None or time.time() >= self._token.renew_at:
                await self._renew()
            assert self._token.value is not None
            return self._token.value

    def _invalidate(self, token: str) -> None:
        if self._token.value == token:
            self._token.renew_at = 0.0

    async def _renew(self) -> None:
        if self._token.cookie is not None and self._token.value is not None:
            try:
                await self._cookie_login()
                return
            except (AuthenticationFailed, BadDeviceResponse):
                self._token.cookie = None  # refused: log in with the password
        await self._password_login()

    async def _password_login(self) -> None:
        http = self._http
        body = {"email": self._email, "password": self._password}
        for _hop in range(3):  # global authenticator -> regional one (at most a couple of hops)
            async with http.request("POST", "/login", json=body) as response:
                payload = await read_json(response, self._problems, "POST /login")
                status = response.status
                cookie = _cookie(response)
            if status != 200 or not isinstance(payload, dict):
                raise AuthenticationFailed(f"login refused (HTTP {status}): {error_text(payload)}")
            location = payload.get("location")
            if isinstance(location, str) and location and _login_token(payload) is None:
                http = self._host(location)
                continue
            self._accept_login(payload, cookie, http)
            return
        raise AuthenticationFailed("login kept redirecting between authenticators")

    async def _cookie_login(self) -> None:
        assert self._token.cookie is not None
        async with self._auth_http.request(
            "GET",
            "/login",
            params={"caller": "cookielogin"},
            headers={"Cookie": self._token.cookie},
        ) as response:
            payload = await read_json(response, self._problems, "GET /login (cookie)")
            status = response.status
            cookie = _cookie(response)
        if status != 200 or _login_token(payload) is None:
            raise AuthenticationFailed(f"token renewal refused (HTTP {status})")
        self._accept_login(payload, cookie or self._token.cookie, self._auth_http)

    def _accept_login(self, payload: Any, cookie: str | None, http: SiteHttp) -> None:
        token = _login_token(payload)
        if token is None:
            self._problems.bad_input(
                "login_answer", f"login answer without authToken: {payload!r:.200}"
            )
            raise AuthenticationFailed("the login answer carries no authToken")
        result = _result(payload)
        authenticator = result.get("authenticator")
        self._auth_http = (
            self._host(authenticator) if isinstance(authenticator, str) and authenticator else http
        )
        self._max_age_ms = self._max_age(result.get("accountInfo"))
        lifetime = token_lifetime(token)
        issued, ttl = lifetime if lifetime else (time.time(), DEFAULT_TOKEN_TTL_S)
        self._token.value = token
        self._token.renew_at = issued + ttl * RENEW_AT
        self._token.cookie = cookie

    def _max_age(self, info: Any) -> int | None:
        """`accountInfo.maxAge` (days) in ms for `/alert?maxage=`; None (no filter) when it is
        missing or not a plausible plan."""
        if not isinstance(info, dict) or info.get("maxAge") is None:
            return None
        days = info["maxAge"]
        if isinstance(days, bool) or not isinstance(days, int | float):
            days = None
        if days is None or not 0 < days <= MAX_AGE_DAYS:
            self._problems.bad_input("max_age", f"accountInfo.maxAge is not a plan: {info!r:.200}")
            return None
        return int(days * 86_400_000)

    def _host(self, host: str) -> SiteHttp:
        """A server the API named (authenticator, logger): our scheme, checked host."""
        host = host.split("://", 1)[-1].rstrip("/")
        if host not in self._hosts:
            self._hosts[host] = self._http.for_host(host)
        return self._hosts[host]

    async def _get(
        self, http: SiteHttp, path: str, params: Params = (), *, auth_in: str = "header"
    ) -> tuple[int, Any]:
        """An authenticated GET; one renewal and retry on a 401.

        The manual puts the token in a different place per route: the `Authorization:
        ManythingToken` header (`auth_in="header"`) for the authenticator, `/cameras/status`
        and the realtime stream; `token=` in the query (`"query"`) for `/alert` and
        `/sendcameratask`. A logger reads it only there.
        """
        for attempt in (1, 2):
            token = await self._auth_token()
            query = list(params.items()) if isinstance(params, Mapping) else list(params)
            headers: dict[str, str] = {}
            if auth_in == "query":
                query.append(("token", token))
            else:
                headers["Authorization"] = f"ManythingToken {token}"
            try:
                async with http.request("GET", path, params=query, headers=headers) as response:
                    payload = await read_json(response, self._problems, f"GET {path}")
                    status = response.status
            except TransportError as exc:
                raise _without_token(exc, token) from None
            if status == 401 and attempt == 1:
                self._invalidate(token)
                continue
            if status == 401:
                raise AuthenticationFailed(f"GET {path}: a fresh token is refused")
            return status, payload
        raise AssertionError("unreachable")


def token_lifetime(token: str) -> tuple[float, float] | None:
    """(issued epoch, lifetime s) read from the token itself, or None."""
    head = token.split("*", 1)[0]
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            text = decode(head + "=" * (-len(head) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            continue
        parts = text.split(":")
        if len(parts) >= 3:
            issued, ttl = as_id(parts[1]), as_id(parts[2])  # "²".isdigit(), but float("²") fails
            if issued is not None and ttl is not None:
                return float(issued), float(ttl)
    return None


def _login_token(payload: Any) -> str | None:
    """The authToken of a login answer, or None when it has none (`{}`, `{"result": 1.0}`)."""
    result = _result(payload)
    token = result.get("authToken") if isinstance(result, dict) else None
    return token if isinstance(token, str) and token else None


def _without_token(exc: TransportError, token: str) -> TransportError:
    """The same error with the token (in a query or a path) out of its message."""
    return type(exc)(str(exc).replace(token, "[token]"), sent=exc.sent)


def _cookie(response: aiohttp.ClientResponse) -> str | None:
    cookies = [f"{name}={morsel.value}" for name, morsel in response.cookies.items()]
    return "; ".join(cookies) or None
