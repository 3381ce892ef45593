"""Checks of command-line arguments shared by ``pyclloss train``, ``bench`` and
``energy``: each raises ValueError with a one-line message that names the flag,
before any work starts."""

import os
import tempfile


def at_least(flag: str, value, minimum) -> None:
    if not value >= minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}")


def above(flag: str, value, bound) -> None:
    if not value > bound:
        raise ValueError(f"{flag} must be > {bound}, got {value}")


def threads(flag: str, value: int) -> None:
    """torch's intra-op threads: 0 (torch's default) up to the CPUs of this machine."""
    cpus = os.cpu_count() or 1
    if not 0 <= value <= cpus:
        raise ValueError(f"{flag} must be in [0, {cpus}] (0: torch's default; this machine has "
                         f"{cpus} CPUs), got {value}")


def writable_folder(flag: str, folder: str, shown: str = "") -> None:
    """``folder`` exists, or is created now, and takes a new file: probed with a
    temporary file, so that a path that cannot be written fails before the work
    rather than after it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {shown or folder}: cannot write there "
                         f"({exc.strerror or exc})") from None


def writable_file(flag: str, path: str) -> None:
    """``path`` can be written: not a folder, and its folder takes a new file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, not a file")
    writable_folder(flag, os.path.dirname(os.path.abspath(path)), path)
