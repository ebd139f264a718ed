"""A W&B sweep agent's trials, emulated as ``wandb agent`` runs them: three trials of the packaged 3D
sweep in a row, each with other sampled values, all finish with their own checkpoints and W&B files.

The command is built by W&B's own sweep helpers from the packaged sweep file (``${env}`` → /usr/bin/env,
``${args}`` → ``--key=value`` per sampled parameter) and run in a fresh process with the environment the
agent gives a trial (``WANDB_RUN_ID``, ``WANDB_SWEEP_ID``, ``WANDB_SWEEP_PARAM_PATH``), offline. The
values are drawn from the sweep's parameter spec here; a short budget is appended to the command.
"""

from __future__ import annotations

import csv
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lorkd_pl.app.cli import main
from lorkd_pl.app.configs import packaged_config

BUDGET = [
    "--trainer.max_epochs=1",
    "--data.init_args.samples_per_epoch=4",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.cache=none",
]


def sample(spec: dict, rng: random.Random):
    """One value of a W&B sweep parameter spec (values / min-max / log_uniform_values)."""
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec["min"], spec["max"]
    if spec.get("distribution") == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def test_three_agent_trials_in_a_row_each_get_their_own_run(tmp_path, monkeypatch, capsys) -> None:
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    monkeypatch.chdir(tmp_path)
    teacher = ["fit", "--config", "demo/teacher_seg", *BUDGET]  # the teacher the recipe distils from
    assert main(teacher) == 0
    sweep = yaml.safe_load(Path(packaged_config("sweeps/lorkd_seg")).read_text())
    rng = random.Random(0)
    env = dict(
        {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # no W&B service of this process
        WANDB_MODE="offline",
        WANDB_SWEEP_ID="emulated",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    trials = {}
    for trial in range(3):
        run_id = f"trial{trial}x{rng.randrange(10**6):06d}"
        args = {key: {"value": sample(spec, rng)} for key, spec in sweep["parameters"].items()}
        param_path = tmp_path / "wandb" / "sweep-emulated" / f"config-{run_id}.yaml"
        param_path.parent.mkdir(parents=True, exist_ok=True)
        config_util.save_config_file_from_dict(str(param_path), args)
        flags = sweep_utils.create_sweep_command_args({"args": args})["args"]
        command = []
        for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
            command += {"${env}": ["/usr/bin/env"], "${args}": flags}.get(chunk, [chunk])
        trial_env = dict(env, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(param_path))
        result = subprocess.run(
            [*command, *BUDGET], env=trial_env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        trials[run_id] = args

    root = tmp_path / "runs" / "demo" / "lorkd_seg"
    assert sorted(p.name for p in root.iterdir()) == sorted([*trials, "latest"])
    assert os.readlink(root / "latest") == list(trials)[-1]
    for run_id, args in trials.items():
        run = root / run_id  # the folder is named by the W&B run
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        hparams = saved["hyper_parameters"]
        assert hparams["rank"] == args["model.init_args.rank"]["value"]  # this trial's sampled values
        assert math.isclose(hparams["lr"], args["model.init_args.lr"]["value"], rel_tol=1e-6)
        (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")  # W&B's files of this trial only
        assert (offline / f"run-{run_id}.wandb").is_file()
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["rank"] == hparams["rank"]
        )

    # the best trial to export: `lorkd-pl runs` ranks them by their ModelCheckpoint's val/score,
    # checked against each trial's own metrics.csv
    def best_logged(run_id: str) -> float:
        with (root / run_id / "metrics.csv").open() as handle:
            return max(float(r["val/score"]) for r in csv.DictReader(handle) if r.get("val/score"))

    capsys.readouterr()
    assert main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[1:4]]
    assert sorted(listed) == sorted(trials)
    scores = [best_logged(run_id) for run_id in listed]
    assert scores == sorted(scores, reverse=True)  # best first (ties in any order)
    best = listed[0]
    assert lines[-1].startswith(
        f"best: {best}; export it with: lorkd-pl export --ckpt {root / best / 'checkpoints'}"
    )
