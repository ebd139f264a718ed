"""Networks and Lightning modules: backbones and heads, the teacher (:mod:`lorkd_pl.models.teacher`),
losses, the generalist, the LoRKD student, its region classifier, the gradient-conflict diagnostic, and
rebuilding a module from a checkpoint (:mod:`~lorkd_pl.models.restore`, given the classes it may build).

May import: ``experts``, ``evaluation`` (test summaries), ``data`` (nothing at import time), ``checks``,
``io``, ``registry``, Lightning, MONAI. Never ``deploy`` or ``app``.
"""

from lorkd_pl import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__)
