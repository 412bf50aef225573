"""The errors hf-dare raises for input it cannot use: a bad value, a missing or unsuitable file, a refused
checkpoint. The message says what is wrong and what would do; the `hf-dare` command prints it on one line. Any
other exception is a bug and keeps its traceback."""

from pathlib import Path

from .modeling.configuration_moe import MoEConfigError


class InputError(ValueError):
    """Input hf-dare cannot use (a value, a path, a file's contents); the message names it and what is allowed."""


USER_ERRORS = (InputError, MoEConfigError, FileNotFoundError)
"""What a user's mistake raises: hf-dare's input errors, an invalid model setting, a path that does not exist."""


def existing_model_folder(path: str | Path) -> Path:
    """`path` as a `Path` if it is a folder with a `config.json` (a saved model), else an `InputError`."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        problem = "no such folder" if not folder.exists() else "no config.json in it"
        raise InputError(f"{folder}: not a saved model folder ({problem}).")
    return folder


__all__ = ["USER_ERRORS", "InputError", "MoEConfigError", "existing_model_folder"]
