"""tokenreward_service: the server that turns a reward model into per-token rewards.

Nothing is loaded or read at import time; see :func:`tokenreward_service.app.create_app`.
"""

__all__: list[str] = []
