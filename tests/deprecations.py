"""Deprecations caused by hf-dare's own calls fail the test that makes them.

transformers and torch announce a removal a few releases ahead, with a FutureWarning / DeprecationWarning or (for
some of transformers' renames) a logged warning that says "deprecated". A deprecation is hf-dare's when it is
raised in transformers or torch and the code that called into them (the innermost frame outside transformers,
torch and the standard library) is hf-dare's: the package, its examples and benchmarks, or the model code saved
in a checkpoint (`transformers_modules`). A deprecation that a test, or another library, causes is left alone.

`raise_deprecations_caused_by_hf_dare()` is the context manager `tests/conftest.py` wraps every test in.
"""

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[1]
OWN_FOLDERS = tuple(str(REPO_ROOT / name) + "/" for name in ("hf_dare", "examples", "benchmarks"))
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
ORIGINS = {"torch", "transformers"}
INFRASTRUCTURE = {"warnings", "logging"}  # the machinery between the warning and its cause


def _package(frame: FrameType) -> str:
    return frame.f_globals.get("__name__", "").split(".")[0]


def _is_own(frame: FrameType) -> bool:
    filename = frame.f_code.co_filename
    return filename.startswith(OWN_FOLDERS) or "/transformers_modules/" in filename


def caused_by_hf_dare(frame: FrameType | None) -> bool:
    """Whether the warning being raised at `frame` (the innermost frame) comes from transformers or torch (or
    from hf-dare calling one of their C functions) on behalf of hf-dare's code."""
    while frame is not None and _package(frame) in INFRASTRUCTURE:
        frame = frame.f_back
    if frame is None or not (_package(frame) in ORIGINS or _is_own(frame)):
        return False
    while frame is not None and (_package(frame) in ORIGINS or _package(frame) in sys.stdlib_module_names):
        frame = frame.f_back
    return frame is not None and _is_own(frame)


class _DeprecationLogHandler(logging.Handler):
    """Raises transformers' logged deprecations that hf-dare's calls cause (e.g. the `past_key_values` rename)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower() and caused_by_hf_dare(sys._getframe(1)):
            raise FutureWarning(f"hf-dare's call is deprecated in transformers: {message}")


@contextmanager
def raise_deprecations_caused_by_hf_dare() -> Iterator[None]:
    """Inside: hf-dare's deprecations raise (as the `error` warnings filter would); other deprecations are ignored
    (as pyproject's filters ignore them); every other warning goes where it went (pytest's record)."""
    with warnings.catch_warnings():
        for category in DEPRECATIONS:
            warnings.simplefilter("always", category)
        recorded = warnings._showwarnmsg_impl  # pytest's recorder: the hook `catch_warnings(record=True)` sets

        def show(message: warnings.WarningMessage) -> None:
            if not issubclass(message.category, DEPRECATIONS):
                recorded(message)
            elif caused_by_hf_dare(sys._getframe(1)):
                raise message.category(f"{message.message} ({message.filename}:{message.lineno})")

        warnings._showwarnmsg_impl = show  # restored by catch_warnings on exit
        handler = _DeprecationLogHandler(logging.WARNING)
        transformers_logger = logging.getLogger("transformers")
        transformers_logger.addHandler(handler)
        try:
            yield
        finally:
            transformers_logger.removeHandler(handler)
