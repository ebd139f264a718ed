"""Networks and Lightning modules: backbones and heads, the teacher, losses, the generalist, the LoRKD
student, and rebuilding any of them from a checkpoint (:mod:`~lorkd_pl.models.restore`).

May import: ``experts``, ``evaluation`` (test summaries), ``data`` (nothing at import time), ``io``,
``registry``, Lightning, MONAI. Never ``deploy`` or ``app``.
"""
