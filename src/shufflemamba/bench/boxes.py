"""Time boxes and error rows shared by the GPU check's sections: an item that fails or meets the end
of its section's box becomes one row of the report, and the others still count."""

from __future__ import annotations

import time
import traceback

TIME_BOX = {"status": "skipped", "reason": "section time box spent"}


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def error_row(exc: BaseException) -> dict[str, str]:
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=6)[-3000:]}
