"""The task catalogue and medical data.

Lives here: task plugins and task-spec files (:mod:`~lorkd_pl.data.plugins`,
:mod:`~lorkd_pl.data.taskspec`), the demo tasks and their data (:mod:`~lorkd_pl.data.demo_tasks`,
:mod:`~lorkd_pl.data.demo`), image readers, dataset formats, validation, the one preprocessing
(:mod:`~lorkd_pl.data.transforms`) and the multi-region datamodule.

May import: ``registry``, ``io``, MONAI, SimpleITK, Lightning's data module. Never ``models``,
``evaluation``, ``deploy`` or ``app``.
"""

import logging
import warnings

from lorkd_pl import lazy_exports

# MONAI's LoadImage instantiates every reader it knows, including an optional GPU DICOM decoder whose
# absence it reports on each construction; lorkd-pl reads with SimpleITK, so this is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


__all__, __getattr__, __dir__ = lazy_exports(__name__)
