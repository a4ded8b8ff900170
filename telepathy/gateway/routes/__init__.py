"""HTTP routes, one router per feature; `attach_routes(app, settings)` includes them all.

    common.py    what routes share: the keyed-route class, the API-key docs, the service and request id, error docs
    classify.py  POST /v1/classify, POST /v1/compare
    catalog.py   GET /v1/tasks, GET /v1/info
    ops.py       GET /healthz, /readyz, /metrics (no API key: probes and scrapers)
    page.py      GET /, /static/{name}: the gateway's page (no API key, like /docs; not in the schema)

Routes are thin: they call a GatewayService method (gateway/serving.py) and return its protocol model. A new
feature adds its own module here and one line below.
"""

from __future__ import annotations

from fastapi import FastAPI

from telepathy.gateway.routes import catalog, classify, ops, page
from telepathy.gateway.routes.common import api_key_docs
from telepathy.gateway.settings import GatewaySettings


def attach_routes(app: FastAPI, settings: GatewaySettings) -> None:
    # The key itself is checked at the edge (gateway/edge.py) for every KeyedRoute; this only documents it.
    app.include_router(classify.router, dependencies=api_key_docs())
    app.include_router(catalog.router, dependencies=api_key_docs())
    app.include_router(ops.router)
    app.include_router(page.router)
