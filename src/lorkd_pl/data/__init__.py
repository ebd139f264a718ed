"""Medical data: readers, dataset formats, transforms, the multi-region datamodule and demo data."""

import logging
import warnings

# MONAI's LoadImage instantiates every reader it knows, including an optional GPU DICOM decoder whose
# absence it reports on each construction; lorkd-pl reads with SimpleITK, so this is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
