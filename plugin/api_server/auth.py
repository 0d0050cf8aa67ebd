"""Who may call the plugin's routes.

Routes that change the model need the admin key: ``HOGWILD_ADMIN_KEY`` if set,
else the server's API key (``--api-key`` / ``VLLM_API_KEY``). vLLM's own key
check covers only paths under /v1 (and a few others), so the plugin checks
every one of its routes itself. Read-only routes need the API key when one is
set. The admin key is accepted as ``Authorization: Bearer`` or, for /v1 paths
where vLLM's middleware already wants the API key in that header, as
``X-Hogwild-Admin-Key``.

Adapter keys (``HOGWILD_ADAPTER_KEYS``, JSON ``{"<key>": ["<adapter>", ...]}``) are sent where
the admin key goes and train (``/train`` with ``adapter``) and delete (``DELETE
/adapters/<name>``) only the adapters they name: never the base, another tenant's adapter, or
any other route that changes the model (403). With adapter keys and no admin or API key,
nobody trains the base.

With no key at all, a server that listens beyond loopback keeps the routes
that change the model off (403) unless ``HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING=1``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from argparse import Namespace

from fastapi import Request

from hogwild import envs

from .http_errors import ApiError

ADMIN_HEADER = "X-Hogwild-Admin-Key"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def _matches(candidates: list[str | None], keys: list[bytes]) -> bool:
    found = False
    for candidate in candidates:
        if candidate:
            d = _digest(candidate)
            for key in keys:
                found |= secrets.compare_digest(d, key)
    return found


def _bearer(request: Request) -> str | None:
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


class Access:
    def __init__(self, args: Namespace):
        api = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        admin = envs.admin_key()
        self.api_keys = [_digest(k) for k in api]
        self.admin_keys = [_digest(admin)] if admin else list(self.api_keys)
        self.refusal = self._refusal(getattr(args, "host", None), getattr(args, "uds", None))
        try:
            self.adapter_keys = [(_digest(key), frozenset(names)) for key, names in envs.adapter_keys().items()]
        except ValueError as exc:  # a tenant must not gain the base through a typo: nothing trains
            self.adapter_keys, self.refusal = [], f"the routes that change the model are off: {exc}"

    def _refusal(self, host: str | None, uds: str | None) -> str | None:
        """Why the routes that change the model are off, or None."""
        if self.admin_keys or uds or host in LOOPBACK or envs.allow_unauthenticated_training():
            return None
        return (f"the routes that change the model are off: this server listens on {host or 'every interface'} "
                "with no key. Start it with --api-key or HOGWILD_ADMIN_KEY, bind it to 127.0.0.1, or set "
                "HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING=1 to let anyone who can reach it train the model")

    def require_admin(self, request: Request) -> None:
        if self.refusal:
            raise ApiError(403, self.refusal)
        if (self.admin_keys or self.adapter_keys) and not _matches([_bearer(request), request.headers.get(ADMIN_HEADER)],
                                                                    self.admin_keys):
            raise ApiError(401, f"this route changes the model: send the admin key (Authorization: Bearer, or {ADMIN_HEADER})")

    def require_trainer(self, request: Request) -> frozenset[str] | None:
        """None for the admin (any job); for an adapter key, the adapters it may train; else 401/403."""
        if self.refusal:
            raise ApiError(403, self.refusal)
        sent = [_bearer(request), request.headers.get(ADMIN_HEADER)]
        if (not self.admin_keys and not self.adapter_keys) or _matches(sent, self.admin_keys):
            return None  # with adapter keys and no admin key, nobody is the admin: every caller shows a key
        for digest, adapters in self.adapter_keys:
            if _matches(sent, [digest]):
                return adapters
        raise ApiError(401, f"this route changes the model: send the admin key, or an adapter key for an adapter "
                       f"(Authorization: Bearer, or {ADMIN_HEADER})")

    def require_adapter(self, request: Request, adapter: str | None) -> None:
        """The admin, or an adapter key whose adapters include ``adapter`` (403 for another's, or the base)."""
        scope = self.require_trainer(request)
        if scope is not None and adapter not in scope:
            what = f"adapter {adapter!r}" if adapter is not None else "the base model's weights (a job without adapter)"
            raise ApiError(403, f"this key may change only the adapters {', '.join(sorted(scope))}, not {what}")

    def require_reader(self, request: Request) -> None:
        if self.api_keys and not _matches([_bearer(request)], self.api_keys + self.admin_keys):
            raise ApiError(401, "send the API key (Authorization: Bearer)")
