"""``lorkd-pl fit|validate|test``: the Lightning command line (LightningCLI + jsonargparse).

Subclass mode for model and data, YAML configs with ``class_path``/``init_args``, ``--print_config``.
The data module's task list defines the model's tasks, heads and experts (argument links). On top of
LightningCLI:

* ``--ckpt_path FILE`` is read once with ``weights_only=True`` and checked against the configured tasks
  (:func:`lorkd_pl.io.compatibility.check_compatible`) before anything is built;
* checkpoints are written atomically (:class:`~lorkd_pl.io.checkpoints.AtomicCheckpointIO`);
* every fit gets its own run folder under ``trainer.default_root_dir`` with a ``latest`` pointer
  (:mod:`lorkd_pl.app.runs`): checkpoints and logs of two fits never mix; a run folder that already
  holds checkpoints (``--run_name`` of an earlier run, a user-set ``dirpath``) is refused unless the fit
  resumes (``--ckpt_path``) or is told to move them aside (``--overwrite``); nothing is deleted;
* ``validate``/``test`` print one results table; lorkd-pl's own errors (:data:`USER_ERRORS`) end the
  command with one ``lorkd-pl: error:`` line and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lorkd_pl.app.commands import LIGHTNING_COMMANDS
from lorkd_pl.app.interrupts import FitInterrupted, InterruptCheckpoint, interruption
from lorkd_pl.app.runs import (
    CREATED,
    RUN_NAME_ENV,
    RunExistsError,
    RunFolderError,
    RunPlacement,
    claim_run,
    discard_unused,
    place_run,
    point_latest,
    started_the_fit,
)
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.formats import DatasetFormatError
from lorkd_pl.data.plugins import PluginError
from lorkd_pl.data.readers import ImageReadError
from lorkd_pl.data.teacher_targets import TeacherTargetError
from lorkd_pl.data.validation import DataValidationError
from lorkd_pl.experts import RoutingError
from lorkd_pl.io.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from lorkd_pl.io.compatibility import check_compatible
from lorkd_pl.io.trust import UntrustedFileError, check_file_network, named_classes
from lorkd_pl.models.base import NonFiniteLossError, TaskModule
from lorkd_pl.models.restore import upgrade_hyperparameters
from lorkd_pl.models.teacher.loading import TeacherError
from lorkd_pl.models.teacher.nnunet import NnUNetError
from lorkd_pl.models.teacher.spec import TeacherSpecError
from lorkd_pl.registry import RegistryError, get_task, order_regions


class _NothingToActOn(logging.Filter):
    """Drops Lightning's messages a lorkd-pl user cannot act on (an advert, a restated default)."""

    NOISE: tuple[str, ...] = ("💡 Tip:", "was configured so 100% of the batches will be used")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(noise in message for noise in self.NOISE)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NothingToActOn())
# Lightning's own pytree helper uses an API the installed torch deprecates: not the user's to fix
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# every fit logs into its own claimed run folder (app.runs: it holds the claim, never earlier logs), a
# resumption into a new resume_<k>: Lightning's warning about deleting earlier logs cannot apply
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


class ConfigError(ValueError):
    """A configuration value the model, data module or trainer refused (jsonargparse's message)."""


# lorkd-pl's own errors: their messages name the file/field and the fix, so no traceback is shown
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    ConfigError,
    DataValidationError,
    DatasetFormatError,
    ImageReadError,
    NonFiniteLossError,
    PluginError,
    RegistryError,
    RoutingError,
    RunExistsError,
    RunFolderError,
    TeacherError,
    NnUNetError,
    TeacherSpecError,
    TeacherTargetError,
    UntrustedFileError,
)


def user_error_message(error: BaseException) -> str | None:
    """The one line of a lorkd-pl error behind ``error``, or ``None``.

    A data pipeline wraps errors: MONAI in ``RuntimeError("applying transform ...")`` (the original
    kept as its cause), and a DataLoader worker's error reaches the main process as a new exception of
    the same type whose message holds the worker's traceback as text. Both are unwrapped here.
    """
    cause = user_error(error)
    if cause is not None:
        return _worker_message(str(cause)) or str(cause)
    return _worker_message(str(error))


def user_error(error: BaseException) -> BaseException | None:
    """The lorkd-pl error (:data:`USER_ERRORS`) ``error`` is or wraps (its cause chain), or ``None``."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, USER_ERRORS):
        cause = cause.__cause__ or cause.__context__
    return cause


def _worker_message(text: str) -> str | None:
    """``<module>.<UserError>: message``, the last line of a DataLoader worker's traceback text."""
    if "Original Traceback" not in text:
        return None
    names = {cls.__name__ for cls in USER_ERRORS}
    for line in reversed(text.strip().splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rpartition(".")[2] in names:
            return message.strip()
    return None


#: ``fit`` options of lorkd-pl's own that say how a run starts, not what it is: not saved in its config.yaml
#: (so that ``lorkd-pl test --config RUN/config.yaml`` takes it).
RUN_OPTIONS: tuple[str, ...] = ("overwrite", "run_name", "ckpt_path")


class RecipeConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` of a run, less :data:`RUN_OPTIONS`."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Save the config (read now: :class:`LorkdCLI` has put back the values it placed)."""
        self.config = self.config.clone()
        for key in RUN_OPTIONS:
            self.config.pop(key, None)
        super().setup(trainer, pl_module, stage)


class LorkdCLI(LightningCLI):
    """LightningCLI whose data module defines the model's tasks and regions (one source of truth)."""

    def add_arguments_to_parser(self, parser) -> None:
        """Link the data module's task list and regions into the model's arguments."""
        parser.link_arguments("data.task_info", "model.init_args.task_info", apply_on="instantiate")
        parser.link_arguments("data.region_names", "model.init_args.regions", apply_on="instantiate")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; file prediction is ``lorkd-pl predict`` (it writes its outputs)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_COMMANDS}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        """Lightning's subcommand parser; ``fit`` also takes ``--overwrite``."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--overwrite",
                action=ActionYesNo,
                default=False,
                help="lorkd-pl: the run's checkpoint folder holds an earlier run's checkpoints: move them "
                "aside to <folder>.replaced-<time>/ and start a new run there (default: stop with an error)",
            )
            parser.add_argument(
                "--run_name",
                type=str | None,
                default=None,
                help="lorkd-pl: the run folder's name under trainer.default_root_dir (default: the W&B run "
                "id with a WandbLogger, slurm-<job id> in a SLURM job, else version_<N>); with --ckpt_path "
                "last: the run to continue (default: the latest)",
            )
        return parser

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        """Lightning's subcommands, with ``verbose`` off: :meth:`_print_results` prints one table."""
        super()._add_subcommands(parser, **kwargs)
        for name in ("validate", "test"):
            self._subcommand_parsers[name].set_defaults(verbose=False)

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (lorkd-pl passes them explicitly: no warning about ``sys.argv`` also holding
        them). ``sys.argv`` is set aside only while parsing: Lightning's DDP launcher re-executes it."""
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` (a file) once, safely, and check it belongs to the configured tasks.

        Replaces LightningCLI's step that loads the checkpoint to merge its model hyperparameters into
        the config: here the file goes through :func:`load_checkpoint_file` (``weights_only=True``,
        clear errors), a checkpoint of other tasks is refused before anything is built, and the task
        list and regions stay linked from the data module rather than taken from the file.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():  # "last"/"best" are resolved (and checked) later
            return
        checkpoint = load_checkpoint_file(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(
                f"{path} is not a training checkpoint (no state_dict: an export's state_dict.pt or a bare "
                "weights file?); --ckpt_path takes RUN/checkpoints/last.ckpt, exports go to lorkd-pl predict"
            )
        hparams = upgrade_hyperparameters(checkpoint.get("hyper_parameters") or {})
        model = self.config[subcommand].get("model")
        configured_class = str(getattr(model, "class_path", "") or "")
        saved_class = str(hparams.get("_class_path") or "")
        saved_kind = checkpoint.get("lorkd_pl_model")
        if (saved_class and configured_class and saved_class != configured_class) or (
            saved_kind and configured_class and configured_class.rpartition(".")[2] != saved_kind
        ):
            raise CheckpointError(
                f"checkpoint {path} holds a {saved_kind or saved_class}, but the config builds "
                f"{configured_class}; a checkpoint never changes the model class: use the config the "
                "checkpoint was trained with (e.g. demo/teacher_* for a generalist)"
            )
        # the classes the file names must be trusted, or named by the user's own config; and a file
        # never chooses the teacher: the config's teacher / teacher_model stay
        for key in ("teacher", "teacher_model"):
            hparams.pop(key, None)
        user_classes = named_classes(_plain(model))
        check_file_network(hparams, f"checkpoint {path}", hparams.get("backbone"), extra=user_classes)
        _check_same_model_kind(path, hparams, model)
        data = self.config[subcommand].get("data")
        task_names = list(getattr(getattr(data, "init_args", None), "tasks", None) or [])
        if task_names:
            specs = [get_task(name) for name in task_names]
            tasks = [
                {"name": s.name, "region": s.region, "classes": s.classes, "class_aliases": s.class_aliases}
                for s in specs
            ]
            check_compatible(f"checkpoint {path}", hparams, tasks, order_regions(s.region for s in specs))
        for key in ("_instantiator", "task_info", "regions"):
            hparams.pop(key, None)
        if "_class_path" not in hparams:  # not made by the CLI: the config alone describes the model
            return
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Place the command's run folder (:mod:`lorkd_pl.app.runs`): the trainer's root, the CSV,
        TensorBoard and W&B loggers and (in :meth:`instantiate_trainer`) checkpoint folders without a
        ``dirpath`` go into it. The config saved with the run (``config.yaml``) stays the one given."""
        self.placement: RunPlacement | None = None
        self._placed: list[tuple[Any, str, Any]] = []  # (namespace, key, the value given)
        if self.subcommand not in LIGHTNING_COMMANDS:
            return
        config = self.config[self.subcommand]
        trainer = config["trainer"]
        loggers = trainer.get("logger")
        specs = [s for s in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(s, "class_path")]
        kinds = {id(spec): str(spec.class_path).rpartition(".")[2] for spec in specs}
        placement = place_run(
            self.subcommand,
            trainer.get("default_root_dir") or DEFAULT_ROOT,
            config.get("ckpt_path"),
            config.get("run_name"),
            wandb="WandbLogger" in kinds.values(),
        )
        # a fit's root is its run (SLURM's requeue checkpoints go there, and are found there again)
        root = placement.run if self.subcommand == "fit" else placement.log_dir
        self._place(trainer, "default_root_dir", str(root))
        for spec in specs:
            kind, args = kinds[id(spec)], spec.init_args
            if kind in ("CSVLogger", "TensorBoardLogger"):  # log_dir = save_dir/name/version
                self._place(args, "save_dir", str(placement.log_dir.parent))
                self._place(args, "name", "")
                self._place(args, "version", placement.log_dir.name)
            elif kind == "WandbLogger":
                self._place(args, "save_dir", str(placement.log_dir))
                self._place(args, "dir", None)
                if placement.wandb_id and self.subcommand == "fit":
                    self._place(args, "id", placement.wandb_id)
        if self.subcommand == "fit":  # the processes Lightning starts for DDP land in the same folder
            os.environ[RUN_NAME_ENV] = placement.name
        self.placement = placement

    def _place(self, namespace: Any, key: str, value: Any) -> None:
        self._placed.append((namespace, key, namespace.get(key)))
        namespace[key] = value

    def instantiate_classes(self) -> None:
        """Build data module, model and trainer; a bad value becomes a :class:`ConfigError`."""
        try:
            self._instantiate_classes()
        finally:
            for namespace, key, value in reversed(self._placed):  # config.yaml: the config as given
                namespace[key] = value

    def _instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as error:  # e.g. more devices than the machine has
            raise ConfigError(
                f"invalid trainer configuration: {str(error).strip()} (check trainer.accelerator and "
                "trainer.devices against this machine; --config trainer/cpu runs on the CPU)"
            ) from None
        except (TypeError, ValueError, KeyError) as error:
            cause = user_error(error)  # jsonargparse wraps ours
            if cause is not None:
                raise cause from None
            raise ConfigError(f"invalid configuration: {_reason(str(error))}") from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with :class:`AtomicCheckpointIO` unless a checkpoint plugin is set,
        and :class:`~lorkd_pl.app.interrupts.InterruptCheckpoint` (a signal ends a fit resumable)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(InterruptCheckpoint())
        if self.placement is not None:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = os.path.realpath(self.placement.checkpoints)  # as Lightning does
        return trainer

    def before_fit(self) -> None:
        """Refuse a run folder or checkpoint folder holding an earlier run, or (``--overwrite``) move it
        aside to ``<folder>.replaced-<time>``: nothing is deleted, and ``last.ckpt`` is the run about
        to be made. ``--ckpt_path last`` without a ``last.ckpt`` to continue is refused too. Then
        ``latest`` points at this run. Only the process that started the fit checks and moves."""
        config = self.config_init[self.subcommand]
        callbacks = self.trainer.checkpoint_callbacks
        folders = [Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and not any(any(f.glob("last*.ckpt")) for f in folders):
            raise RunFolderError(
                f"--ckpt_path last: there is no last.ckpt in {', '.join(map(str, folders)) or 'any folder'} "
                "to continue (the run was stopped before its first checkpoint, or it keeps none: "
                "ModelCheckpoint save_last); start it again without --ckpt_path"
            )
        placement = self.placement
        resuming = bool(ckpt_path) or (placement is not None and placement.log_dir != placement.run)
        if not resuming and started_the_fit():
            earlier: dict[Path, list[Path]] = {}
            if placement is not None and placement.run.is_dir():
                earlier[placement.run] = sorted(placement.run.iterdir())
            for folder in folders:  # a checkpoint folder of the user's (a dirpath outside the run)
                if folder.is_dir() and (
                    placement is None or not folder.is_relative_to(placement.run.resolve())
                ):
                    earlier[folder] = sorted(folder.glob("*.ckpt"))
            earlier = {folder: paths for folder, paths in earlier.items() if paths}
            if earlier and not config.get("overwrite"):
                folder, paths = next(iter(earlier.items()))
                names = ", ".join(p.name for p in paths[:4]) + (", …" if len(paths) > 4 else "")
                if placement is not None and folder == placement.run:
                    resume = f"--ckpt_path last --run_name {placement.name}"
                else:  # a checkpoint folder of the user's (dirpath)
                    resume = f"--ckpt_path {folder / 'last.ckpt'}"
                raise RunExistsError(
                    f"{folder} holds an earlier run ({names}); resume it with {resume}, move it aside with "
                    "--overwrite, or start another run (another --run_name, or none: a new version_<N>)"
                )
            for folder, paths in earlier.items():
                aside = Path(f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                if placement is not None and folder == placement.run:
                    folder.rename(aside)  # the whole earlier run: checkpoints, logs, config, W&B files
                    folder.mkdir()
                else:  # a checkpoint folder of the user's: its checkpoints only
                    aside.mkdir(parents=True, exist_ok=True)
                    for path in paths:
                        path.rename(aside / path.name)
                rank_zero_info(f"lorkd-pl: moved the earlier run from {folder} to {aside}")
        if placement is not None and not resuming and started_the_fit():
            claim_run(placement.run)  # of two fits started together under one name, one goes on
        if placement is not None and started_the_fit():
            if not point_latest(placement.root, placement.name):
                rank_zero_info(f"lorkd-pl: {placement.root / 'latest'} could not point at this run")
            rank_zero_info(f"lorkd-pl: run folder {placement.run}")

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's subcommand; a checkpoint whose weights do not fit the configured model is one
        clear error instead of PyTorch's key-by-key report."""
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:  # Lightning's ending of a fit stopped by SIGTERM (code 0) or Ctrl-C (code 1)
            stopped = interruption(getattr(self, "trainer", None))
            if stopped is None:
                raise
            raise FitInterrupted(stopped) from None
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            first = str(error).strip().splitlines()
            earlier = ""
            if "Missing key(s)" in str(error) and ".expert_" in str(error):
                earlier = (
                    "; a LoRKD student from an earlier lorkd-pl, whose transposed convolutions carried no "
                    "experts: add --model.init_args.transposed_convs=false"
                )
            elif "Missing key(s)" in str(error) and '"router.' in str(error):
                earlier = (
                    "; it was trained without a region router (the packaged LoRKD configs now train one): "
                    "add --model.init_args.router_weight=0"
                )
            elif "Unexpected key(s)" in str(error) and '"router.' in str(error):
                earlier = "; it has a region router: set model.init_args.router_weight > 0 (e.g. 1.0)"
            raise CheckpointError(
                "the checkpoint's weights do not fit the configured model "
                f"({' '.join(first[1:2]).strip()[:200]}); use the model config it was trained with "
                f"(its run's config.yaml){earlier}"
            ) from None

    def after_validate(self) -> None:
        """Print the validation results once."""
        self._print_results("val")

    def after_test(self) -> None:
        """Print the test results once."""
        self._print_results("test")

    def _print_results(self, stage: str) -> None:
        if not self.trainer.is_global_zero:
            return
        rows = [
            (name, float(value))
            for name, value in sorted(self.trainer.callback_metrics.items())
            if name.startswith(f"{stage}/") and getattr(value, "numel", lambda: 1)() == 1
        ]
        width = max([len(name) for name, _ in rows] + [len("metric")])
        print(f"{'metric'.ljust(width)}  value")
        for name, value in rows:
            print(f"{name.ljust(width)}  {value:.4f}")


#: Hyper-parameters that make a model another kind of model (not a setting of the same one): a
#: checkpoint must agree with the config on them, else it would silently replace the configured model.
MODEL_KIND_KEYS: dict[str, str] = {
    "experts": "region experts (false: the plain-KD control)",
    "backbone.class_path": "backbone class",
}


def _check_same_model_kind(path: str, hparams: dict[str, Any], model: Any) -> None:
    """Refuse a checkpoint whose model kind (:data:`MODEL_KIND_KEYS`) differs from the config's.

    Raises:
        CheckpointError: naming both values and the fix.
    """
    configured = _plain(getattr(model, "init_args", None) or {})
    for key, what in MODEL_KIND_KEYS.items():
        saved, wanted = _lookup(hparams, key), _lookup(configured, key)
        if saved is None or wanted is None or saved == wanted:
            continue
        raise CheckpointError(
            f"checkpoint {path} has {key}={saved!r} ({what}), the config builds {key}={wanted!r}: it is "
            "another kind of model, and testing it under this config would report it as this one; use "
            f"the config it was trained with (its run's config.yaml), or set --model.init_args.{key}="
            f"{saved!r} if you mean it"
        )


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def _plain(value: Any) -> Any:
    """A jsonargparse namespace as plain dicts and lists (to read the class names it holds)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _reason(message: str) -> str:
    """The model's or data module's own message inside jsonargparse's "Does not validate against any of
    the Union subtypes" report (which lists every subtype tried and dumps the whole config)."""
    if not message.startswith("Does not validate against any of the Union subtypes"):
        return message
    reasons = [
        line[4:].strip()
        for line in message.splitlines()
        if line.startswith("  - ") and not line.startswith("  - Expected a <class 'NoneType'>")
    ]
    return reasons[0] if reasons else message


def _wandb_run() -> Any:
    """The W&B run of this process (``wandb.run``), ``None`` without one (W&B not even imported)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


#: The runs' root of a config without ``trainer.default_root_dir`` (Lightning's folder name).
DEFAULT_ROOT = "lightning_logs"


def lightning_cli(args: Sequence[str], run: bool = True) -> LorkdCLI:
    """Build (and by default run) the Lightning command line on ``args`` (``[subcommand, ...]``)."""
    given, created, outer_wandb_run = os.environ.get(RUN_NAME_ENV), len(CREATED), _wandb_run()
    failed = True
    try:
        cli = LorkdCLI(
            TaskModule,
            MultiRegionDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args),
            run=run,
            save_config_callback=RecipeConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
        failed = False
        return cli
    except BaseException:  # a command that stopped before writing leaves no empty run folder behind
        for folder in CREATED[created:]:
            discard_unused(folder)
        raise
    finally:  # a fit's run name reaches only the processes it starts, not the next command
        wandb_run = _wandb_run()
        if wandb_run is not None and wandb_run is not outer_wandb_run:  # this command's W&B run ends
            wandb_run.finish(exit_code=int(failed))  # (else the next command in this process would reuse it)
        del CREATED[created:]
        if given is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = given


def _configured(args: Sequence[str]) -> tuple[Any, Any]:
    """The model and data module a fit with ``args`` (``--config X``, overrides) would build."""
    cli = lightning_cli(list(args), run=False)
    model, datamodule = cli.model, cli.datamodule
    spec = getattr(model, "teacher_spec", None)
    if spec is None:
        raise ConfigError("the config sets no model.init_args.teacher: there is no teacher to run")
    return model, datamodule


def teacher_targets(args: Sequence[str], device: str = "cpu") -> str:
    """``lorkd-pl teacher-targets --config X``: build the cached teacher targets of the training and
    validation cases now (a fit then reuses them); returns the summary line."""
    from lorkd_pl.models.teacher.pipeline import describe_build, prepare_targets

    model, datamodule = _configured(args)
    if not model.teacher_spec.cache:
        raise ConfigError("model.init_args.teacher.cache is not set: there is nothing to build; set a folder")
    datamodule.setup("fit")
    teacher = model.teacher.to(device)
    store, report = prepare_targets(teacher, model.teacher_spec, datamodule, device)
    return describe_build(store, report, teacher, datamodule)


def teacher_test(args: Sequence[str], out: str, device: str = "cpu") -> list[Path]:
    """``lorkd-pl teacher-test --config X --out DIR``: test the configured teacher in its own pipeline
    on the tasks' test splits; writes ``DIR/summary/<task>.json`` (for ``lorkd-pl report --teacher``)."""
    from lorkd_pl.models.teacher.pipeline import evaluate_teacher, task_pipelines

    model, datamodule = _configured(args)
    datamodule.setup("test")
    teacher = model.teacher.to(device)
    records = {name: [] for name in datamodule.task_names}
    for record in datamodule.shard_records("test"):
        records[record["case"].partition("/")[0]].append(record)
    pipelines = task_pipelines(model.teacher_spec, datamodule)
    return evaluate_teacher(teacher, pipelines, datamodule.task_info, records, out, device)
