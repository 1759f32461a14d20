"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("specred")


def progress(iterable, desc: str = "", unit: str = "item", total: int | None = None, enabled: bool = True):
    """Iterate with progress: a bar when stderr is a TTY, else a log line every ~10 %."""
    if not enabled:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, unit=unit, total=total, leave=False)
        return
    step = max(1, (total or 10) // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if total and (i % step == 0 or i == total):
            log.info("%s: %d/%d %s", desc, i, total, unit + ("s" if total != 1 else ""))
