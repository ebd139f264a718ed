"""Storage: atomic writes, checkpoint files, hashing and the one checkpoint-compatibility rule.

Lives here: :mod:`~lorkd_pl.io.atomic` (files and folders written through a temporary sibling and a
rename), :mod:`~lorkd_pl.io.checkpoints` (``weights_only=True`` loads with clear errors, Lightning's
atomic checkpoint plugin), :mod:`~lorkd_pl.io.hashing` (sha256 of files and folders) and
:mod:`~lorkd_pl.io.compatibility` (which checkpoint fits which run).

May import: the standard library, torch, Lightning's checkpoint plugin base. Nothing of lorkd-pl
except other ``io`` modules.
"""
