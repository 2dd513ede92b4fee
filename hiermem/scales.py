"""The scale vocabulary: one name per size, the same for the demo, the notebooks and the data presets.

    smoke   the whole pipeline in seconds to minutes on a CPU: tests, CI, a first look
    small   the CPU study: `make demo` (10 min on 2 cores), the notebooks' real runs, the CPU sweeps' data
    study   the paper's evaluation experiments at the size 2 CPU cores afford (configs/sweeps/study/)
    full    every installed data source and the largest trees (data presets only)

Names are ordered smallest first. A consumer accepts the names it has a recipe for (`ACCEPTED`) and
refuses any other in one line that names those (`check`); a new size is one entry here plus a recipe in each consumer that
runs it. The README's "Scales" table is this one.
"""

from __future__ import annotations

SCALES: dict[str, str] = {
    "smoke": "the whole pipeline in seconds to minutes on a CPU: tests, CI, a first look",
    "small": "the CPU study: `make demo` (10 min on 2 cores), the notebooks' real runs, the CPU sweeps' data",
    "study": "the paper's evaluation at the size 2 CPU cores afford: configs/sweeps/study/ (about 3.5 h)",
    "full": "every installed data source and the largest trees (data presets only)",
}

# consumer -> the scales it has a recipe for (each a subset of SCALES, in its order)
ACCEPTED: dict[str, tuple[str, ...]] = {
    "demo": ("smoke", "small"),       # hiermem.demo.SCALES: DemoConfig recipes
    "notebooks": ("smoke", "small", "study"),  # the notebooks' `scale` parameter (each notebook: NOTEBOOK_SCALES)
    "data": ("smoke", "small", "full"),  # DataConfig.preset / CorpusConfig.preset
    "knowledge": ("smoke", "small"),  # DataConfig.knowledge (`regime: knowledge` in a data config)
    "study": ("smoke", "study"),  # hiermem.study: the study's sweeps as written or their smoke versions
}
LABELS = {"demo": "hiermem demo", "notebooks": "the notebooks", "data": "the data presets",
          "knowledge": "the knowledge regime", "study": "the study"}


def accepted(consumer: str) -> tuple[str, ...]:
    """The scales `consumer` ("demo", "notebooks", "data") accepts, smallest first."""
    return ACCEPTED[consumer]


def check(name: str, consumer: str) -> str:
    """`name` if `consumer` accepts it, else a one-line ValueError naming the accepted scales."""
    names = accepted(consumer)
    if name not in names:
        raise ValueError(f"unknown scale {name!r} for {LABELS[consumer]}; accepted: {', '.join(names)}")
    return name


def describe(consumer: str) -> str:
    """One line for a --help text: the accepted names with their meanings."""
    return "; ".join(f"{name}: {SCALES[name]}" for name in accepted(consumer))
