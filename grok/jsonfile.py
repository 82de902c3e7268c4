"""Reading the small JSON files of a checkpoint (``config.json``, ``tokenizer.tok.json``).

Every way such a file can fail to be read (missing, a directory, no permission, too large,
not UTF-8, not JSON, nested deeper than the parser's stack, an integer longer than Python
converts, ``NaN``/``Infinity`` literals, which JSON does not have) becomes one error of the
caller's class naming the file, so a CLI prints one line instead of a traceback.
The standard ``json`` module does the parsing; this only bounds and wraps it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from grok.errors import GrokError


def read_json_file(
    path: str | os.PathLike[str], *, error: type[GrokError], what: str, max_bytes: int
) -> Any:
    """The parsed JSON of ``path``, or ``error`` naming the file and what went wrong.

    Args:
      path: the file.
      error: the exception class to raise (``ConfigError``, ``TokenizerError``, ...).
      what: what the file is, for messages ("config file", "tokenizer file").
      max_bytes: refuse larger files before reading them (bounds memory and time).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # a FIFO or device has no size to check first
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: {what} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None

    def refuse_constant(name: str) -> Any:
        raise error(f"{path}: {name} is not a JSON number (NaN and Infinity are refused)")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except GrokError:
        raise
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested deeper than the parser allows)") from None
    except ValueError as err:  # an integer longer than int() converts (sys.int_info)
        raise error(f"{path}: not valid JSON ({err})") from None
