"""The router's HTTP layer: health, metrics, the REST API and the dashboard, on one port.

* :mod:`~fabric.router.http.ports`: the narrow parts of the router it is given (never the router).
* :mod:`~fabric.router.http.models`: the request and response models (the OpenAPI schemas).
* :mod:`~fabric.router.http.views`: answers built from the parts, shared by the API and the dashboard.
* :mod:`~fabric.router.http.api`: the REST API, an ``APIRouter``.
* :mod:`~fabric.router.http.dashboard`: the dashboard's pages, assets, live stream and history.
* :mod:`~fabric.router.http.app`: the application (error answers, health, the OpenAPI document).
* :mod:`~fabric.router.http.server`: uvicorn inside the router's event loop.
"""

from fabric.router.http.app import build_app
from fabric.router.http.ports import Parts
from fabric.router.http.server import ApiServer

__all__ = ["ApiServer", "Parts", "build_app"]
