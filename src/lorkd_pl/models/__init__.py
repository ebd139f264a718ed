"""Networks and Lightning modules: backbones and heads, the teacher (:mod:`lorkd_pl.models.teacher`),
losses, the generalist, the LoRKD student, its region classifier, the gradient-conflict diagnostic, and
rebuilding a module from a checkpoint (:mod:`~lorkd_pl.models.restore`, given the classes it may build).

May import: ``experts``, ``evaluation`` (test summaries), ``data`` (nothing at import time), ``checks``,
``io``, ``registry``, Lightning, MONAI. Never ``deploy`` or ``app``.
"""

from lorkd_pl import lazy_exports

_EXPORTS: dict[str, str] = {
    "StepLoss": "lorkd_pl.models.base",
    "TaskModule": "lorkd_pl.models.base",
    "GeneralistModule": "lorkd_pl.models.generalist",
    "LoRKDModule": "lorkd_pl.models.lorkd",
    "restore_module": "lorkd_pl.models.restore",
    "RegionClassifier": "lorkd_pl.models.router",
    "RouterNetwork": "lorkd_pl.models.router",
    "GradientConflict": "lorkd_pl.models.conflicts",
    "Teacher": "lorkd_pl.models.teacher.loading",
    "TeacherError": "lorkd_pl.models.teacher.loading",
    "load_teacher": "lorkd_pl.models.teacher.loading",
    "TeacherSpec": "lorkd_pl.models.teacher.spec",
    "parse_teacher": "lorkd_pl.models.teacher.spec",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
