"""The API's routes, one router per area; :data:`ROUTERS` is what ``create_app`` includes."""

from __future__ import annotations

from . import admin, events, health, instances, stats, web, worklist

ROUTERS = (health.router, web.router, admin.router, worklist.router, instances.router, stats.router, events.router)
