"""The README's first command: examples/quickstart.py trains, saves, reloads with `trust_remote_code=True` and
generates; run here (fewer steps) under the suite's deprecation guard (tests/conftest.py), so a FutureWarning /
DeprecationWarning that hf-dare's calls cause on the installed transformers fails it."""

import re

from tests.test_digits_vqa import load_example


def test_quickstart_trains_saves_reloads_and_generates_without_deprecations(tmp_path, capsys):
    load_example("quickstart").main(["--out", str(tmp_path), "--steps", "12"])
    printed = capsys.readouterr().out
    assert "generated: the cat sat on" in printed
    avg_k = float(re.search(r"overall Avg K = ([0-9.]+)", printed).group(1))
    assert 1.0 <= avg_k <= 4.0
    assert (tmp_path / "model" / "modeling_moe.py").is_file()
    assert (tmp_path / "model" / "_compat.py").is_file()  # the shipped compat module travels with the code
