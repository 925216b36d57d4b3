"""Every ```python block in the README runs as written (a new user pastes them)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# the Dask cluster example runs as a script in tests/test_distributed.py
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
          if "fastbp.distributed" not in b]


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # blocks may write files (F.save)
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), {"__name__": "__readme__"})
