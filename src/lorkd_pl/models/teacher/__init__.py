"""The teacher (the frozen foundation model), in one home.

Lives here: :mod:`~lorkd_pl.models.teacher.spec` (the ``teacher:`` description a config gives: path,
output kind, classes, its own pipeline), :mod:`~lorkd_pl.models.teacher.outputs` (how an output kind
becomes a KD target), :mod:`~lorkd_pl.models.teacher.class_mapping` (student classes onto teacher
channels, by name), :mod:`~lorkd_pl.models.teacher.loading` (TorchScript, checkpoints, MONAI bundles,
lorkd-pl generalists → :class:`~lorkd_pl.models.teacher.loading.Teacher`) and
:mod:`~lorkd_pl.models.teacher.pipeline` (the teacher run in its own pipeline: cached targets, the
teacher test).

This package's ``__init__`` imports nothing, so a module may import one of its modules without loading
the others (:mod:`~lorkd_pl.models.generalist` names its union classes through ``class_mapping``).
"""
