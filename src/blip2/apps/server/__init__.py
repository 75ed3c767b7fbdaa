"""``blip2 serve``: BLIP-2 over HTTP with micro-batching. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart); nothing else in the package imports this."""

from blip2.apps.server.app import ServerSettings, bind, create_app, decode_image, run_server
from blip2.apps.server.batcher import MicroBatcher, QueueFull

__all__ = ["MicroBatcher", "QueueFull", "ServerSettings", "bind", "create_app", "decode_image", "run_server"]
