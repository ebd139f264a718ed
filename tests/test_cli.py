"""The console script entry point."""

import pytest

from lorkd_pl import __version__
from lorkd_pl.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorkd-pl {__version__}"
    assert __version__ != "0.0.0"  # installed metadata is found
