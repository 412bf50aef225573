"""The modules that moved in hf-dare 0.2 still import under their 0.1 names (the same module objects), with a
FutureWarning that names the new place."""

import importlib
import sys

import pytest

from hf_dare._renamed import RENAMED_MODULES


@pytest.mark.parametrize("old, new", sorted(RENAMED_MODULES.items()))
def test_old_module_name_is_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"{old} is now {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
