"""Write a benchmark's section into README.md between two HTML comment markers.

Shared by the scripts in ``benchmarks/`` (they import it as ``readme`` with this folder on
``sys.path``); the standard library only.
"""

from __future__ import annotations

import os
from typing import Callable

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def write_section(start_marker: str, end_marker: str, text: str | Callable[[str], str], readme: str = README, *,
                  if_missing: Callable[[str | None, str], str] | None = None) -> None:
    """Replace only what lies between ``start_marker`` and ``end_marker`` in ``readme`` with ``text``.

    The file is re-read right before writing and written through a temporary file and
    ``os.replace``. ``text`` may be a callable: it gets the text now between the markers and
    returns the new one. Without the markers (or without the file), ``if_missing(current, block)``
    returns the whole new file (``current`` is ``None`` when there is no file, ``block`` is the
    markers around the text); with no ``if_missing`` that is a ``SystemExit``.
    """
    current = None
    if os.path.exists(readme) or if_missing is None:
        with open(readme, encoding="utf-8") as f:
            current = f.read()
    start = -1 if current is None else current.find(start_marker)
    end = -1 if current is None else current.find(end_marker)
    found = start != -1 and end > start
    if callable(text):
        text = text(current[start + len(start_marker):end] if found else "")
    block = f"{start_marker}\n{text}\n{end_marker}"
    if found:
        new = current[:start] + block + current[end + len(end_marker):]
    elif if_missing is not None:
        new = if_missing(current, block)
    else:
        raise SystemExit(f"{readme} has no {start_marker} ... {end_marker} markers")
    tmp = f"{readme}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, readme)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
