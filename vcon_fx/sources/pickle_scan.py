"""Tell an unsafe pickle from a corrupt file, and name what it would import, without unpickling.

A weights_only load refuses both; only the first deserves "pass --trust-pickle if you trust it".
The scan walks pickle opcodes with pickletools: nothing from the file is ever executed.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

__all__ = ["unsafe_globals", "scan_pickle_globals"]


def unsafe_globals(err: BaseException, path: Path | None = None) -> list[str] | None:
    """The globals a refused weights_only load needed, or None if the failure was not that.

    torch names the first refused global in its message; otherwise the pickle is scanned
    statically (opcodes only, nothing is executed). A file that does not even parse is
    corrupt, not unsafe, and gives None.
    """
    text = str(err)
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    named = set(re.findall(r"GLOBAL ([\w.]+)", text))  # torch names only the first one it refused
    scanned = scan_pickle_globals(path) if path is not None else None
    if scanned is None and not named:
        return None
    names = named | {n for n in scanned or () if not _is_plain(n)}
    # Foreign code first: builtins.eval says more than torch.nn.Linear.
    return sorted(names, key=lambda n: (n.startswith("torch."), n)) or ["objects the safe loader cannot read"]


def _is_plain(name: str) -> bool:
    return name.startswith(_TENSOR_GLOBALS) or name.endswith("Storage") or name in _PLAIN_BUILTINS


# Globals every torch.save file uses to rebuild tensors; not worth naming in an error.
_TENSOR_GLOBALS = ("torch._utils.", "torch.storage.", "collections.OrderedDict", "torch.serialization.")
_PLAIN_BUILTINS = {f"{m}.{t}" for m in ("builtins", "__builtin__") for t in ("set", "dict", "list", "tuple", "int", "float")}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def scan_pickle_globals(path: Path) -> list[str] | None:
    """List the module.name globals a pickle (or torch.save zip) references, without unpickling.

    Returns:
        The sorted global names, or None when the file is not a parsable pickle.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = z.read(member)
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    found: set[str] = set()
    stream = io.BytesIO(data)
    parsed = 0
    # Legacy torch.save files are several pickles in a row followed by raw storage bytes.
    while stream.tell() < len(data):
        try:
            found |= _globals_of_one_pickle(stream)
        except Exception:  # pickletools raises ValueError and friends on non-pickle bytes
            break
        parsed += 1
    return sorted(found) if parsed else None


def _globals_of_one_pickle(stream: io.BytesIO) -> set[str]:
    found: set[str] = set()
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    last: str | None = None
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "INST":
            found.add(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        if name in _STRING_OPS:
            last = str(arg)
            strings.append(last)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(int(arg))
            if last is not None:
                strings.append(last)
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif name != "FRAME":
            last = None
    return found
