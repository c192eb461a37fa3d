"""A small sentiment reward model trained here, the default model of ``tokenreward serve``.

``python -m tokenreward_service.demo.train`` rebuilds it from scratch (see :mod:`.train`); the
checkpoint lives in ``demo/model/``. Importing this package does nothing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_DIR"]

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Where the committed checkpoint lives and where training writes by default."""
