"""Paths in requests (checkpoint targets, later readout files, datasets,
configs) must resolve inside the configured roots; anything else is a 403.

Roots: ``HOGWILD_PATH_ROOTS`` (``os.pathsep``-separated), else the served
model's directory and the state directory. Resolution follows symlinks, so a
link inside a root that points outside it is refused too.
"""

from __future__ import annotations

from pathlib import Path

from hogwild import envs

from .http_errors import ApiError


class PathPolicy:
    def __init__(self, roots: list[Path]):
        self.roots = [r.resolve() for r in roots]

    @classmethod
    def from_env(cls, defaults: list[Path]) -> "PathPolicy":
        return cls(envs.path_roots() or defaults)

    def confine(self, value: str, param: str) -> Path:
        """The resolved path, if it lies inside a root; else ApiError 403."""
        if "\x00" in value or not value.strip():
            raise ApiError(422, f"{param}: not a usable path", param)
        path = Path(value).expanduser()
        resolved = (path if path.is_absolute() else self.roots[0] / path).resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise ApiError(403, f"{param}: {value} is outside the directories requests may name "
                           f"({', '.join(map(str, self.roots))}); set HOGWILD_PATH_ROOTS to allow others", param)
        return resolved
