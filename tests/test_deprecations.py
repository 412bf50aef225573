"""The suite's deprecation guard (tests/deprecations.py): a deprecation that transformers raises because of
hf-dare's call fails, the same deprecation caused by other code does not."""

import pytest
import transformers
from transformers.utils.deprecation import deprecate_kwarg

from tests.deprecations import REPO_ROOT, raise_deprecations_caused_by_hf_dare


@deprecate_kwarg("old_name", "99.0.0", new_name="new_name")
def renamed(new_name=None):
    return new_name


def call_from(folder: str):
    """A function whose code lives (as far as frames tell) in `folder` of the repository, calling `renamed`."""
    namespace = {"renamed": renamed}
    code = compile("def caller():\n    return renamed(old_name=1)\n", str(REPO_ROOT / folder / "caller.py"), "exec")
    exec(code, namespace)
    return namespace["caller"]


def test_transformers_deprecation_caused_by_hf_dare_raises():
    with raise_deprecations_caused_by_hf_dare(), pytest.raises(FutureWarning, match="old_name"):
        call_from("hf_dare")()


def test_transformers_deprecation_caused_by_other_code_passes():
    with raise_deprecations_caused_by_hf_dare():
        assert call_from("tests")() == 1
        assert renamed(old_name=2) == 2


def test_logged_deprecation_caused_by_hf_dare_raises():
    logger = transformers.utils.logging.get_logger("transformers.test_deprecations")
    namespace = {"logger": logger}
    source = "def caller():\n    logger.warning('`x` is deprecated, use `y`')\n"
    exec(compile(source, str(REPO_ROOT / "hf_dare" / "caller.py"), "exec"), namespace)
    with raise_deprecations_caused_by_hf_dare(), pytest.raises(FutureWarning, match="deprecated"):
        namespace["caller"]()
