"""The HTTP API (FastAPI) and the web page.

``app.py`` wires the app (``create_app``); ``routes/`` holds one router per area (health, web page,
admin and accounts, worklist, instances, stats, events); ``deps.py`` the dependencies the routes
take (session, clock, settings, heatmaps), kept on ``app.state``; ``auth.py`` tokens and roles;
``errors.py`` the error answers; ``render.py`` image previews; ``security.py`` headers and body
limit; ``server.py`` the uvicorn component.  A new area is one module in ``routes/`` and one entry
in ``routes.ROUTERS``.
"""
