"""Backend registry shared by every op: rank backends, pick the first that supports the inputs.

`auto` picks the best available backend and logs the choice once per (op, device, dtype);
a backend asked for by name that cannot serve raises, listing the valid choices. No backend
is ever chosen through environment variables.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("longtrain.kernels")


class BackendError(ValueError):
    """A backend asked for by name cannot serve the given inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    # supports(device, dtype, **shape_facts) -> None when usable, else the reason it is not.
    supports: Callable[..., str | None]


class OpRegistry:
    """Backends of one op, best first."""

    def __init__(self, op: str):
        self.op = op
        self.backends: list[Backend] = []
        self._logged: set = set()
        self._warned: set = set()

    def register(self, name: str, fn: Callable, supports: Callable[..., str | None]) -> None:
        self.backends = [b for b in self.backends if b.name != name]
        self.backends.append(Backend(name, fn, supports))

    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def select(self, backend: str | None, device: torch.device, dtype: torch.dtype, **facts) -> Backend:
        if backend not in (None, "auto"):
            for b in self.backends:
                if b.name == backend:
                    reason = b.supports(device=device, dtype=dtype, **facts)
                    if reason:
                        usable = [c.name for c in self.backends
                                  if c.supports(device=device, dtype=dtype, **facts) is None]
                        raise BackendError(f"{self.op} backend {backend!r} cannot run here: {reason}; "
                                           f"valid choices here: auto, {', '.join(usable)}")
                    return b
            raise BackendError(f"unknown {self.op} backend {backend!r}; valid choices: auto, {', '.join(self.names())}")
        skipped = []
        for b in self.backends:
            reason = b.supports(device=device, dtype=dtype, **facts)
            if reason is None:
                key = (device.type, dtype, b.name)
                if key not in self._logged:
                    self._logged.add(key)
                    log.info("%s: using backend %r on %s/%s (passed over: %s)", self.op, b.name,
                             device.type, dtype, "; ".join(skipped) or "none")
                return b
            skipped.append(f"{b.name}: {reason}")
        raise BackendError(f"no {self.op} backend supports {device.type}/{dtype}: {'; '.join(skipped)}")

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def always(**_) -> None:
    return None
