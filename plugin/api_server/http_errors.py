"""Errors of the plugin's routes, in vLLM's (OpenAI-style) error shape.

The plugin's routes use their own route class so that a request that fails
validation answers 422 with a message naming the field, whatever vLLM's global
handler does for its own routes (it answers 400).
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": HTTPStatus(status).phrase, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# Tags of discriminated unions (e.g. /train's ``mode``): pydantic puts the tag in
# an error's location, but the client never wrote it as a field.
UNION_TAGS: set[str] = set()


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    if parts and parts[0] in UNION_TAGS:
        parts = parts[1:]
    return ".".join(parts)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    lines = [f"{_loc(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:10]]
    if len(errors) > 10:
        lines.append(f"...and {len(errors) - 10} more")
    return "; ".join(lines), (_loc(errors[0].get("loc", ())) or None) if errors else None


class PluginRoute(APIRoute):
    """Renders validation failures as 422, and ``ApiError``/``HTTPException`` as their status."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                message, param = validation_message(exc.errors())
                return error_response(422, message, param)
            except ApiError as exc:
                return error_response(exc.status, exc.message, exc.param, exc.headers)
            except HTTPException as exc:  # e.g. a body over the size limit, while FastAPI reads it
                return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

        return guarded
