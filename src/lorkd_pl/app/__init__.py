"""The command-line shell: argument parsing, the Lightning CLI, packaged configs and the demo.

Lives here: :mod:`~lorkd_pl.app.cli` (``lorkd-pl``: parses arguments with the standard library only
and imports a command's code when that command runs, so ``--help`` starts fast),
:mod:`~lorkd_pl.app.lightning` (``fit``/``validate``/``test`` through LightningCLI),
:mod:`~lorkd_pl.app.configs` (the configs shipped inside the package) and :mod:`~lorkd_pl.app.demo`
(``lorkd-pl demo``).

May import everything below it (``deploy``, ``evaluation``, ``models``, ``data``, ``experts``, ``io``,
``registry``); nothing below imports ``app``.
"""
