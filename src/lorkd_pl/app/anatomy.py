"""``lorkd-pl anatomy-check``: teacher / plain KD / LoRKD on real brain anatomy (MNI ICBM152 2009a).

The 3D demo with its synthetic brain replaced by :mod:`lorkd_pl.data.anatomy`'s task
(``mni_brain_tissue``: CSF, grey and white matter of simulated acquisitions of the real template),
everything else unchanged: the packaged ``demo/*_seg`` configs (chosen on the demo's validation split,
never on this check), the same budget, KD and test protocol. Writes ``<out>/data`` (the subjects, once
per data seed), ``<out>/configs`` (the configs used), the three runs, ``<out>/report.md`` and
``<out>/results.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorkd_pl.app.configs import config_root
from lorkd_pl.app.demo import derive_configs, run_demo, run_seeds, save_results
from lorkd_pl.checks import check_seed
from lorkd_pl.data.anatomy import (
    TASK_NAME,
    VERSION_MARKER,
    locate_mni152,
    version_line,
    write_anatomy_data,
)
from lorkd_pl.data.plugins import load_plugins

#: The 3D demo's tasks with the synthetic brain replaced by the real one.
TASKS: tuple[str, ...] = ("demo_abdomen_seg", TASK_NAME, "demo_pelvis_seg", "demo_thorax_seg")


def ensure_anatomy_data(folder: Path, mni_dir: str | None, data_seed: int) -> Path:
    """``folder`` holding the subjects of ``data_seed``, simulated first if missing or outdated.

    Raises:
        FileExistsError: ``folder`` exists but was not written by lorkd-pl (it is never replaced).
    """
    version = folder / "VERSION"
    found = version.read_text(encoding="utf-8").strip() if version.is_file() else ""
    if found == version_line(data_seed):
        return folder
    if folder.exists() and not found.startswith(VERSION_MARKER + " "):
        raise FileExistsError(
            f"{folder} exists but holds no anatomy-check subjects (no {VERSION_MARKER} VERSION file); "
            f"lorkd-pl does not replace it: choose another --out"
        )
    paths = locate_mni152(mni_dir)
    print(f"simulating the anatomy-check subjects from {paths['t1'].parent} into {folder} ...", flush=True)
    return write_anatomy_data(folder, paths, seed=data_seed, overwrite=folder.exists())


def check_out_folder(root: Path) -> None:
    """Refuse an existing, non-empty ``root`` that is not an anatomy-check folder (its report, results
    and configs would be overwritten).

    Raises:
        FileExistsError: naming the folder and the fix.
    """
    if root.is_dir() and any(root.iterdir()) and not (root / "data" / "VERSION").is_file():
        raise FileExistsError(
            f"{root} is not empty and is not an anatomy-check folder (no data/VERSION); "
            f"choose another --out (lorkd-pl never overwrites a folder it did not create)"
        )


def main(
    out: str = "runs/anatomy",
    seed: int = 0,
    mni_dir: str | None = None,
    quick: bool = False,
    data_seed: int = 0,
    seeds: list[int] | None = None,
    per_region_control: bool = False,
) -> str:
    """Run the check into ``out``; print and return the report.

    Args:
        out: output folder (data, configs, runs, report).
        seed: seed of every fit.
        seeds: several seeds (each a full check, runs side by side as ``seed<N>``), replacing ``seed``.
        per_region_control: also the per-region control (one plain-KD student per region).
        mni_dir: folder with the template files (default: the installed nilearn's data).
        quick: tiny budgets: checks the pipeline, the numbers mean nothing.
        data_seed: seed of the simulated subjects.
    """
    seeds = list(seeds or [seed])
    for value in seeds:  # before 90 s of simulation, not after
        check_seed(value, "--seeds" if len(seeds) > 1 else "--seed")
    check_seed(data_seed, "--data-seed")
    torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    root = Path(out)
    check_out_folder(root)
    data = ensure_anatomy_data(root / "data", mni_dir, data_seed)
    load_plugins([data / "tasks"], use_entry_points=False)
    configs = derive_configs(config_root() / "demo", root / "configs", root, ["seg"], tasks=TASKS)
    report, results = run_seeds(
        seeds,
        lambda value: run_demo(
            configs,
            kinds=("seg",),
            quick=quick,
            seed=value,
            root=root,
            predict_task=TASK_NAME,
            per_region_control=per_region_control,
        ),
    )
    results["data_seed"] = data_seed
    report = save_results(root, report, results, time.perf_counter() - start, seeds)
    print(report)
    return report
