"""The analysis framework: presets, resolved settings, run specifications, the Analysis base.

An analysis (one module in :mod:`biasshift.reproduce`, registered in
:data:`biasshift.reproduce.ANALYSES`) declares

* ``presets`` — ``"paper"`` (the default: the paper's dataset, network, epochs, seeds, learning
  rates) and ``"quick"`` (the embedded digits, a few epochs; under two minutes on two cores;
  with ``--dataset mnist`` or ``fashion-mnist`` the quick preset trains on the first
  :data:`QUICK_TRAIN_SIZE` training and :data:`QUICK_TEST_SIZE` test images, about the size of
  the digits, so that it stays quick);
* how one run's model, plug-ins and optimizer are built (:meth:`Analysis.build_model`,
  :meth:`Analysis.plugins`, :meth:`Analysis.optimizer`);
* :meth:`Analysis.aggregate` — the tidy table of all runs (one row per run x epoch x layer x
  quantity; see :data:`TIDY_COLUMNS`) — and :meth:`Analysis.plot`.

The runs of an analysis are the product activations x learning rates x seeds
(:meth:`Analysis.run_specs`; an analysis may add optimizers, see ``natural-gradient-gap``);
:mod:`biasshift.reproduce.runner` trains them (resumably, in parallel processes when asked) and
writes ``NAME.csv``, ``NAME.png``, ``NAME.pdf`` and ``NAME.json``.

Analysis-specific settings live in ``Preset.options`` (``--option KEY=VALUE`` on the command
line); an analysis may add rows and columns to each run's table (:meth:`Analysis.run_frame`,
:attr:`Analysis.tidy_columns`) and headline numbers to the JSON (:meth:`Analysis.summary`).

The tidy CSV columns
    ==============  ==========================================================================
    ``analysis``    the analysis name, e.g. ``activation-median``
    ``run``         the run id ``<activation>-lr<lr>-seed<seed>``
    ``dataset``     ``mnist``, ``fashion-mnist`` or ``digits``
    ``activation``  ``elu``, ``relu``, ``lrelu`` or ``srelu``
    ``seed``        the run's seed (0, 1, ...)
    ``lr``          the learning rate
    ``epoch``       0 = before training, then 1, 2, ... (per-unit summaries: the last epoch)
    ``layer``       ``all`` for whole-net quantities, else the module name (``act3``, ``eact2``)
    ``unit``        the unit index for per-unit quantities, empty otherwise
    ``quantity``    ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``,
                    ``running_loss``, ``median_of_means``, ``diverged``, and per analysis
                    e.g. ``median_change_var``
    ``value``       the number (NaN/inf recorded as they occurred in a diverged run)
    ==============  ==========================================================================

    An analysis may add columns (:attr:`Analysis.tidy_columns`, e.g. ``optimizer``, ``step`` and
    ``stat`` in ``natural-gradient-gap``); the columns above are always there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from biasshift.monitor.selection import ModuleSpec
from biasshift.train.plugins import Plugin

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from biasshift.data.base import ArrayDataset
    from biasshift.train.trainer import Augment, OptimizerFactory, Trainer

__all__ = [
    "ANALYSES",
    "DATASETS",
    "QUICK_TEST_SIZE",
    "QUICK_TRAIN_SIZE",
    "TIDY_COLUMNS",
    "Analysis",
    "Preset",
    "RunSpec",
    "Settings",
    "UsageError",
    "register",
]

TIDY_COLUMNS = ("analysis", "run", "dataset", "activation", "seed", "lr", "epoch", "layer",
                "unit", "quantity", "value")
DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "cifar100")
#: training / test images of the quick preset on MNIST and Fashion-MNIST (the digits have 1437/360)
QUICK_TRAIN_SIZE = 1500
QUICK_TEST_SIZE = 500


class UsageError(ValueError):
    """Bad settings or a run folder that does not fit them; the CLI prints it and exits with 2."""


@dataclass(frozen=True)
class Preset:
    """Default settings of an analysis; every field can be overridden from the CLI."""

    dataset: str
    epochs: int
    seeds: int
    activations: tuple[str, ...]
    lrs: tuple[float, ...]
    batch_size: int = 64
    probe_size: int | None = 10_000
    model: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One training run of an analysis: everything that determines its result.

    The run folder ``<work_dir>/<run>/`` keeps its ``spec.json``; a resume checks that the spec
    is the same (except ``epochs``, which may grow).  ``optimizer`` names the run's optimizer
    (``"sgd"``: the trainer's plain SGD) and ``options`` holds the analysis-specific settings
    that shape the run; ``train_size`` / ``test_size`` limit the run to the first samples of
    the dataset (``None``: all). A ``spec.json`` written before these fields existed reads as
    ``"sgd"``, ``{}`` and ``None``.
    """

    analysis: str
    run: str
    dataset: str
    activation: str
    seed: int
    lr: float
    epochs: int
    batch_size: int
    probe_size: int | None
    model: dict[str, Any]
    optimizer: str = "sgd"
    options: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    test_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def run_id(activation: str, lr: float, seed: int, optimizer: str = "sgd") -> str:
        """``<activation>-lr<lr>-seed<seed>``, with ``-<optimizer>`` after the activation for
        optimizers other than plain SGD."""
        opt = "" if optimizer == "sgd" else f"-{optimizer}"
        return f"{activation}{opt}-lr{lr:g}-seed{seed}"


@dataclass(frozen=True)
class Settings:
    """Fully resolved settings of one ``biasshift reproduce NAME`` invocation.

    ``resume`` reuses finished runs and continues checkpointed ones; ``overwrite`` discards
    them instead (without either, a run folder that holds checkpointed work is an error).
    ``keep_checkpoints`` keeps a finished run's ``checkpoint.pt`` (needed to extend it to more
    epochs later; by default it is removed when the run finishes). ``jobs`` x ``threads``
    default to the cores available (see ``resolve_settings``).
    """

    analysis: str
    preset: str
    dataset: str
    data_dir: str | None
    epochs: int
    seeds: int
    activations: tuple[str, ...]
    lrs: tuple[float, ...]
    batch_size: int
    probe_size: int | None
    model: dict[str, Any]
    device: str
    out: Path
    work_dir: Path
    resume: bool = False
    jobs: int = 1
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    keep_checkpoints: bool = False
    train_size: int | None = None
    test_size: int | None = None
    batch_runs: int = 1  # runs per stacked model (0: from memory; 1: one by one)

    @property
    def quick(self) -> bool:
        return self.preset == "quick"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["work_dir"] = str(self.out), str(self.work_dir)
        d["quick"] = self.quick
        return d


class Analysis:
    """Base class of a registered analysis. Subclasses set the class attributes and ``plot``.

    Attributes:
        name: the CLI name (``biasshift reproduce NAME``), also the output file stem.
        figure: which figure of the paper it reproduces (``"Fig. 2"``).
        description: one line for ``biasshift list``.
        loss: the trainer's loss (``"cross_entropy"`` or ``"reconstruction"``).
        presets: ``{"paper": Preset, "quick": Preset}``, optionally ``"cuda"``: the preset used
            instead of ``"paper"`` when ``--device`` is a CUDA device (a full-scale protocol
            for a GPU machine).
        min_epochs: the fewest epochs the analysis can summarise.
        probe_medians: whether runs need each unit's exact probe median (costly; see
            :class:`~biasshift.train.Trainer`).
        tidy_columns: the columns of the tidy CSV (:data:`TIDY_COLUMNS` plus any the analysis
            adds in :meth:`run_frame`).
        batch_runs: the default of ``--batch-runs`` (runs trained together as one stacked
            model, :func:`biasshift.reproduce.runner.plan_stacks`): ``1`` one by one,
            ``"auto"`` from the free memory where the runs share an architecture.
    """

    name: str = ""
    figure: str = ""
    description: str = ""
    loss: str = "cross_entropy"
    presets: dict[str, Preset] = {}  # noqa: RUF012 (overridden per subclass)
    min_epochs: int = 1
    probe_medians: bool = False
    tidy_columns: tuple[str, ...] = TIDY_COLUMNS
    batch_runs: int | str = 1

    # --------------------------------------------------------------- settings and runs
    def preset_name(self, quick: bool, device_type: str) -> str:
        """Which of :attr:`presets` a command uses: ``"quick"`` with ``--quick``, else
        ``"paper"``; an analysis with a ``"cuda"`` preset (more seeds for a GPU) uses it for a
        non-quick command on ``--device cuda``."""
        if quick:
            return "quick"
        return "cuda" if device_type == "cuda" and "cuda" in self.presets else "paper"

    def validate(self, settings: Settings) -> None:
        """Raise :class:`UsageError` for settings the analysis cannot use."""
        if settings.epochs < self.min_epochs:
            raise UsageError(f"{self.name} needs --epochs >= {self.min_epochs}, "
                             f"got {settings.epochs}")

    def run_specs(self, settings: Settings) -> list[RunSpec]:
        """The runs: every activation x learning rate x seed (in that nesting order)."""
        return [
            RunSpec(
                analysis=self.name, run=RunSpec.run_id(act, lr, seed), dataset=settings.dataset,
                activation=act, seed=seed, lr=lr, epochs=settings.epochs,
                batch_size=settings.batch_size, probe_size=settings.probe_size,
                model=dict(settings.model),
            )
            for act in settings.activations
            for lr in settings.lrs
            for seed in range(settings.seeds)
        ]

    # --------------------------------------------------------------- one run
    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        """The run's freshly initialised model (called under the trainer's init seed)."""
        raise NotImplementedError

    def probe_modules(self, spec: RunSpec) -> ModuleSpec:
        """Which modules the probe statistics cover (default: every activation module)."""
        return None

    def plugins(self, spec: RunSpec) -> list[Plugin]:
        """Plug-ins of one run (fresh objects per run)."""
        return []

    def optimizer(self, spec: RunSpec) -> OptimizerFactory | None:
        """The run's optimizer factory; ``None`` is plain SGD with ``spec.lr``."""
        return None

    def trainer_options(self, spec: RunSpec) -> dict[str, Any]:
        """Further keyword arguments of the run's :class:`~biasshift.train.Trainer` (e.g.
        ``reconstruction_loss``); default none."""
        return {}
    def prepare_dataset(self, spec: RunSpec, dataset: ArrayDataset) -> ArrayDataset:
        """The dataset the run trains on, from the loaded one (after the spec's
        ``train_size``/``test_size``): e.g. preprocessing or a subset. Default: unchanged."""
        return dataset

    def augment(self, spec: RunSpec) -> Augment | None:
        """The run's training-batch augmentation (the trainer's ``augment``); default none."""
        return None

    def run_frame(self, spec: RunSpec, frame: pd.DataFrame, run_dir: Path,
                  trainer: Trainer | None) -> pd.DataFrame:
        """One run's tidy rows (columns :attr:`tidy_columns`) from the trainer's history
        ``frame`` (columns :data:`TIDY_COLUMNS`).

        Called after training with the ``trainer`` (its plug-ins hold their results; write what
        a later reuse needs into ``run_dir``), and with ``trainer=None`` when a finished run
        is reused from ``run_dir``.  The default returns ``frame`` unchanged.
        """
        return frame

    # --------------------------------------------------------------- results
    def aggregate(self, frames: Sequence[pd.DataFrame], settings: Settings) -> pd.DataFrame:
        """The tidy table of all runs (columns :attr:`tidy_columns`, sorted by run order)."""
        cols = list(self.tidy_columns)
        if not frames:
            return pd.DataFrame(columns=cols)
        df = pd.concat(frames, ignore_index=True)
        return df[cols]

    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        """The figure for the tidy table ``df``."""
        raise NotImplementedError

    def summary(self, df: pd.DataFrame, settings: Settings) -> dict[str, Any] | None:
        """Headline numbers for the JSON record (its ``summary`` key); ``None``: none."""
        return None

    def default_out(self, quick: bool) -> Path:
        return Path("figures") / "quick" if quick else Path("figures")

    def default_work_dir(self, quick: bool) -> Path:
        """``<user cache>/runs/[quick/]NAME``: ``$XDG_CACHE_HOME/biasshift/runs/...`` (without
        ``XDG_CACHE_HOME``: ``~/.cache/biasshift/runs/...``), never the working directory."""
        from biasshift.data.base import cache_dir

        runs = cache_dir() / "runs"
        return runs / "quick" / self.name if quick else runs / self.name


# ----------------------------------------------------------------------------- the registry
#: every registered analysis by name (filled by the analysis modules; see ``registry``)
ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` under ``analysis.name`` (a second one with that name is an error)."""
    if not analysis.name:
        raise ValueError(f"{type(analysis).__name__} has no name")
    old = ANALYSES.get(analysis.name)
    if old is not None and type(old) is not type(analysis):
        raise ValueError(f"analysis {analysis.name!r} is registered twice "
                         f"({type(old).__name__} and {type(analysis).__name__})")
    for preset in ("paper", "quick"):
        if preset not in analysis.presets:
            raise ValueError(f"analysis {analysis.name!r} lacks the {preset!r} preset")
    ANALYSES[analysis.name] = analysis
    return analysis
