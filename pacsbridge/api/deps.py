"""What the routes depend on, kept on ``app.state`` by :func:`pacsbridge.api.app.create_app` and
handed to them by the small dependency functions here (``Depends(db_session)``, ``Depends(now)``...):
no module globals, and a test app is just ``create_app`` with other values."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

from fastapi import Depends, Request
from fastapi import Path as PathParam
from sqlalchemy.orm import Session, sessionmaker

from ..imaging import DEFAULT_MAX_DECODED_BYTES
from . import render

log = logging.getLogger("pacsbridge.api.app")

DEFAULT_CLAIM_TIMEOUT_S = 1800.0
#: Image previews rendered at once (each decodes an image: up to max_decoded_bytes of memory).
DEFAULT_MAX_CONCURRENT_RENDERS = 2
#: Database ids are 64-bit signed integers.
MAX_ID = 2**63 - 1
#: No list is that long; a larger offset is a client error, not a database overflow.
MAX_OFFSET = 1_000_000_000

ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="worklist item id")]
InstanceId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="instance id")]


@dataclass(frozen=True)
class ApiSettings:
    """The settings the routes read (from the daemon's :class:`pacsbridge.config.Settings`)."""

    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S
    spool_dir: Path | None = None
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_concurrent_renders: int = DEFAULT_MAX_CONCURRENT_RENDERS
    viewer_url: str = ""
    mode: str = "live"
    stats_cache_s: float = 10.0


class HeatmapService:
    """Grad-CAM heatmaps with a model of their own (not the worker's: Grad-CAM needs gradients and hooks),
    loaded on first use, one heatmap at a time."""

    def __init__(self, load: Callable[[], Any] | None) -> None:
        self._load = load
        self._model: Any | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Any | None) -> HeatmapService:
        """``model``: None, a loaded model, or a function that loads one (called on the first heatmap)."""
        if model is None or callable(model):
            return cls(model)
        return cls(lambda: model)

    @property
    def configured(self) -> bool:
        return self._load is not None

    @property
    def available(self) -> bool:
        """A model is configured and this build has the heatmap module."""
        return self.configured and render.heatmap_module() is not None

    def grad_cam(self, module: Any, pixels: Any) -> Any:
        with self._lock:
            try:
                if self._model is None and self._load is not None:
                    self._model = self._load()
                return module.grad_cam(self._model, pixels)
            except Exception as exc:  # noqa: BLE001 - a heatmap failure must not take the image route down
                log.exception("heatmap failed")
                raise render.RenderError(503, f"heatmap failed: {type(exc).__name__}: {exc}") from None


async def sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def db_session(request: Request) -> Iterator[Session]:
    """One session per request, closed after the answer."""
    with request.app.state.sessions() as session:
        yield session


async def now(request: Request) -> datetime:
    """The time of this request, from the app's clock (tests move it)."""
    return request.app.state.clock()


async def api_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def heatmaps(request: Request) -> HeatmapService:
    return request.app.state.heatmaps


Sessions = Annotated[sessionmaker[Session], Depends(sessions)]
DbSession = Annotated[Session, Depends(db_session)]
Now = Annotated[datetime, Depends(now)]
Config = Annotated[ApiSettings, Depends(api_settings)]
Heatmaps = Annotated[HeatmapService, Depends(heatmaps)]
