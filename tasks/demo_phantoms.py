"""Demo tasks: synthetic phantoms of four regions, segmentation (3D) and classification (2D).

The data is generated locally on first use (``lorkd_pl.data.demo``), into ``$LORKD_PL_DEMO_DATA`` or
``~/.cache/lorkd-pl/demo``; ``lorkd-pl demo-data --out DIR`` writes the same files plus task specs.
"""

from lorkd_pl.data.demo import demo_task_specs
from lorkd_pl.registry import register_task

for spec in demo_task_specs():
    register_task(spec)
