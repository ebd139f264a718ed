"""The command table of ``lorkd-pl``: which commands Lightning runs and which read a config without
training, with their one-line help (standard library only: the shell and the Lightning CLI both read it).
"""

from __future__ import annotations

LIGHTNING_COMMANDS: tuple[str, ...] = ("fit", "validate", "test")
LIGHTNING_HELP = {
    "fit": "train a model (Lightning fit; --overwrite moves an earlier run's checkpoints aside)",
    "validate": "validate a checkpoint per task (Lightning validate)",
    "test": "test a checkpoint per task and write summary/<task>.json (Lightning test)",
}

TEACHER_COMMANDS: tuple[str, ...] = ("teacher-targets", "teacher-test")
TEACHER_HELP = {
    "teacher-targets": "build the cached teacher targets of a config now (a fit reuses them); "
    "lorkd-pl teacher-targets --config X [--device cuda]",
    "teacher-test": "test a config's (outside) teacher in its own pipeline, writing OUT/summary/<task>.json "
    "for lorkd-pl report --teacher; lorkd-pl teacher-test --config X --out OUT [--device cuda]",
}
