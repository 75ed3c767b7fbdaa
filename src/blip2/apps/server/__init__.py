"""``blip2 serve``: BLIP-2 over HTTP with micro-batching. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart); nothing else in the package imports this."""

from blip2.apps.server.app import bind, create_app, run_server, uvicorn_config
from blip2.apps.server.batcher import MicroBatcher, QueueFull
from blip2.apps.server.service import ServerSettings, Service

__all__ = ["MicroBatcher", "QueueFull", "ServerSettings", "Service", "bind", "create_app", "run_server",
           "uvicorn_config"]
