"""Modules of hf-dare 0.1 that moved in 0.2, importable under their old names for one more release, with a
FutureWarning naming the new one (one import hook for them all; `import hf_dare` installs it)."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

RENAMED_MODULES = {
    "hf_dare.flops": "hf_dare.evaluation.flops",
    "hf_dare.report": "hf_dare.evaluation.report",
    "hf_dare.images": "hf_dare.data.images",
    "hf_dare.legacy": "hf_dare.conversion.legacy",
    "hf_dare.training.data": "hf_dare.data.llava",
    "hf_dare.modeling.configuration_moe_llava": "hf_dare.modeling.configuration_moe",
    "hf_dare.modeling.modeling_moe_llava": "hf_dare.modeling.modeling_moe",
}


class RenamedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it became (the same module object), warning once per name."""

    def find_spec(self, fullname, path, target=None):
        if fullname in RENAMED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = RENAMED_MODULES[spec.name]
        warnings.warn(f"{spec.name} is now {new}; the old name goes in the next release", FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    if not any(isinstance(finder, RenamedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(RenamedModuleFinder())
