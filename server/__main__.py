"""`python -m server ...` is the `xyserve` command."""

from __future__ import annotations

import sys

from server.cli import console_main

sys.exit(console_main())
