"""xyserve's OpenAI-compatible HTTP server: `build_app(engine, config)` and the `xyserve` CLI."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("xyserve")
except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
    __version__ = "0.0.0+unknown"
