"""Trex Serve core: a Ray-free asyncio library behind the gateway's deployments."""

__version__ = "0.1.0"
