"""Run configuration: a YAML file validated by pydantic.

The config contract (other tools write it)::

    store: runs/demo/features.zarr      # URL of the feature store (fsspec; a local path by default)
    dataset: digits-lt                  # or {name: digits-lt, imbalance_ratio: 20}; omit if the store is complete
    backbone: {kind: builtin}           # optional; builtin | torchscript | python
    methods: [ce, {name: logit-adjust, params: {tau: 1.0}}, ce+pc,
              {name: my-loss, target: mypkg.losses:MyHead, params: {epochs: 20}}]
    output: runs/demo                   # run directory (report, metrics.json)

Optional keys: ``seed`` (feeds every generator), ``device`` (auto | cpu | cuda[:N]),
``artifacts`` (URL of the artifact cache, default ``OUTPUT/cache``), ``evaluation``
(many/few thresholds, shot-group rule, ECE bins, group metrics), ``extraction`` (batch size, chunk rows),
``runner`` (the Prefect task runner: threads | dask | ray, workers, address),
``storage_options`` (fsspec options of a remote store and artifact cache), ``lock_timeout``
(seconds a second writer of the same store waits for the first).
An unknown key anywhere is an error that names the key.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longtail.stages.errors import LongtailError


#: the seeds every generator takes (numpy's, torch's): non-negative and below 2**63
SEED_RANGE = (0, 2**63)


def check_seed(value: Any, where: str = "seed") -> int:
    """``value`` when it is an integer seed in :data:`SEED_RANGE` (not a bool, not a float)."""
    lo, hi = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise ValueError(f"{where}: {value!r} must be an integer in [0, 2**63)")
    return value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with numbers written ``1e-3`` or ``5E-4`` read as numbers (YAML 1.2;
    PyYAML follows YAML 1.1, which wants ``1.0e-3`` and reads ``1e-3`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, with :class:`_Loader` (``1e-3`` is a number): the config file and
    every ``--set KEY=VALUE`` go through it."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no Python objects


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as ``{KEY: value}``, each value read as YAML (:func:`load_yaml`);
    a malformed one is a LongtailError naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LongtailError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())
            raise LongtailError(f"--set {item!r}: the value is not valid YAML ({first})") from None
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """The built-in dataset and its parameters; a parameter left out (None) takes the dataset's
    default, and only the parameters given are passed to it (digits-lt's per class counts,
    digits-glt's per group counts and protocol)."""

    name: str = "digits-lt"
    imbalance_ratio: float = Field(20.0, ge=1.0)
    test_per_class: int | None = Field(None, ge=1)
    val_per_class: int | None = Field(None, ge=1)
    # digits-glt (generalized long tail): protocol clt | alt | glt and the attribute profile
    protocol: Literal["clt", "alt", "glt"] | None = None
    attribute_ratio: float | None = Field(None, ge=1.0)
    num_attributes: int | None = Field(None, ge=2)
    test_per_group: int | None = Field(None, ge=1)
    val_per_group: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _digits_lt_defaults(cls, v: Any) -> Any:
        """digits-lt's per class counts are spelled out (50 test, 20 val), as they always were."""
        if isinstance(v, dict) and v.get("name", "digits-lt") == "digits-lt":
            return {"test_per_class": 50, "val_per_class": 20} | v
        return v


class BackboneConfig(_Strict):
    kind: Literal["builtin", "torchscript", "python"] = "builtin"
    # builtin small CNN (stage 1 trained here)
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(5e-4, ge=0)
    width: int = Field(32, ge=1)
    # torchscript
    path: str | None = None
    method: str = "forward"
    # python: ``target`` is called with ``kwargs``, i.e. the config runs code; refused unless the
    # config's owner sets ``allow_code: true`` (or the machine sets LONGTAIL_ALLOW_CODE=1)
    target: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    classifier: str | None = None
    allow_code: bool = False

    @model_validator(mode="after")
    def _check_kind(self) -> "BackboneConfig":
        if self.kind == "torchscript" and not self.path:
            raise ValueError("backbone.path is required for kind 'torchscript'")
        if self.kind == "python" and not self.target:
            raise ValueError("backbone.target ('package.module:function') is required for kind 'python'")
        return self


class ExtractionConfig(_Strict):
    batch_size: int = Field(256, ge=1)


class EvaluationConfig(_Strict):
    many_threshold: int = Field(100, ge=0)
    few_threshold: int = Field(20, ge=0)
    split_rule: Literal["auto", "absolute", "quantile"] = "auto"
    ece_bins: int = Field(20, ge=1)
    #: (class, attribute) group metrics: None = whenever the test split has attributes; true =
    #: required (an error when it has none); false = off
    groups: bool | None = None
    #: imbalance ratios of the shifted test sets (paper 002 Sec. 4.3); an empty list turns them off
    shift_ratios: list[float] = Field(default_factory=lambda: [50, 25, 10, 5, 2, 1])

    @field_validator("shift_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(r < 1 for r in v):
            raise ValueError("every shift ratio must be >= 1")
        if len(set(v)) != len(v):
            raise ValueError("shift ratios must not repeat")
        return v


class RunnerConfig(_Strict):
    """How independent stage-2 tasks run (issue 5): a Prefect task runner.

    ``threads`` (default) runs them in this process; ``dask`` on a local Dask cluster of
    ``workers`` processes, or on the scheduler at ``address`` (``tcp://host:8786``); ``ray`` on a
    local Ray instance or the cluster at ``address`` (``ray://host:10001``; needs the ``ray`` extra).
    """

    kind: Literal["threads", "dask", "ray"] = "threads"
    workers: int = Field(4, ge=1)
    address: str | None = None

    @model_validator(mode="after")
    def _address(self) -> "RunnerConfig":
        if self.address is not None and self.kind == "threads":
            raise ValueError("address is only for the dask and ray runners")
        return self


class MethodSpec(_Strict):
    """One configured method: its name (the registry's grammar, ``ce``, ``ce+pc``, ``dlsa+ce``), its
    parameters, and for a user's own method the class its base part is built from,
    ``target: package.module:Class`` (a :class:`stages.base.Method` subclass, importable).

    ``label`` names it in ``metrics.json``, the report and ``stage`` (default: its name), so one
    method can be listed twice with other parameters. ``select_for`` marks a member of a
    val-selected sweep (see :func:`expand_grids`): the label of the entry it competes for. With
    several ``seeds`` (:func:`expand_seeds`) each entry is fitted once per seed: ``seed`` is the
    seed of this fit (instead of the run's ``seed``), ``seed_of`` the label the fits are averaged under."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    target: str | None = None
    label: str = ""
    select_for: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    seed_of: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_label(cls, v: Any) -> Any:
        if isinstance(v, dict) and not v.get("label") and isinstance(v.get("name"), str):
            return {**v, "label": v["name"]}
        return v


def _grid_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)


def expand_grids(entries: list[Any]) -> list[Any]:
    """Method entries with a ``grid`` (``{param: [values]}``) replaced by one member per combination:
    label ``LABEL[p=v,...]``, the combination's values over ``params``, ``select_for: LABEL``. Each
    member is a method of its own (own cached fit); evaluation keeps, under ``LABEL``, the member with
    the best balanced accuracy on the **val** split (:mod:`pipeline.combine`)."""
    out: list[Any] = []
    for entry in entries:
        if not isinstance(entry, dict) or "grid" not in entry or entry.get("select_for"):
            out.append(entry)
            continue
        label = entry.get("label") or entry.get("name")
        grid = entry["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"methods: {label}: grid must be a non-empty mapping of parameter names to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"methods: {label}: grid.{key} must be a non-empty list of values")
            if isinstance(entry.get("params"), dict) and key in entry["params"]:
                raise ValueError(f"methods: {label}: {key!r} is both in params and in grid")
        base = {k: v for k, v in entry.items() if k != "grid"}
        for combo in itertools.product(*grid.values()):
            chosen = dict(zip(grid, combo))
            out.append({**base, "params": {**(base.get("params") or {}), **chosen}, "select_for": label,
                        "label": f"{label}[" + ",".join(f"{k}={_grid_value(v)}" for k, v in chosen.items()) + "]"})
    return out


def expand_seeds(entries: list[Any], seeds: list[int]) -> list[Any]:
    """Each method entry once per seed: with one seed, the entry with ``seed`` set; with several,
    label ``LABEL@seed=S``, ``seed: S``, ``seed_of: LABEL`` (evaluation averages them under
    ``LABEL``, :mod:`pipeline.combine`). Entries already expanded (``seed_of`` set) stay as they are."""
    out: list[Any] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("seed_of") or entry.get("seed") is not None:
            out.append(entry)
        elif len(seeds) == 1:
            out.append({**entry, "seed": seeds[0]})
        else:
            label = entry.get("label") or entry.get("name")
            out.extend({**entry, "label": f"{label}@seed={s}", "seed": s, "seed_of": label} for s in seeds)
    return out


class RunConfig(_Strict):
    store: str
    dataset: DatasetConfig | None = None
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    methods: list[MethodSpec] = Field(min_length=1)
    output: str
    artifacts: str | None = None
    seed: int = 0
    #: the seeds of the stage-2 fits (every method once per seed); default ``[seed]``
    seeds: list[int] | None = None
    device: str = "auto"
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    #: fsspec options for ``store`` and ``artifacts`` (``endpoint_url``, ``profile``, ...);
    #: credentials belong in the environment, not here (configs travel as flow parameters)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: seconds a second writer of the same store (or remote artifact) waits for the first
    lock_timeout: float = Field(600.0, ge=0)

    @field_validator("store", "output", "artifacts")
    @classmethod
    def _not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (an empty path would write into the working directory)")
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, v: Any) -> Any:
        return check_seed(v)

    @field_validator("output")
    @classmethod
    def _local_output(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"{v!r}: the run directory must be a local path (the report and plots are "
                             "written to local files); remote URLs are for store and artifacts")
        return v

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _expand_methods(cls, data: Any) -> Any:
        """Method names as mappings, then sweeps and seeds expanded into one entry per fit."""
        if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
            return data
        methods = expand_grids([{"name": m} if isinstance(m, str) else m for m in data["methods"]])
        seeds = data.get("seeds")
        if seeds is not None:
            if not isinstance(seeds, list) or not seeds:
                raise ValueError("seeds: give a non-empty list of seeds, e.g. [0, 1, 2]")
            for x in seeds:
                check_seed(x, f"seeds: {x!r} in {seeds!r}")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds: {seeds!r} lists a seed more than once")
            methods = expand_seeds(methods, seeds)
        return {**data, "methods": methods}

    @model_validator(mode="after")
    def _unique_methods(self) -> "RunConfig":
        labels = [m.label for m in self.methods] + sorted(
            {m.select_for for m in self.methods if m.select_for} | {m.seed_of for m in self.methods if m.seed_of})
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(f"methods: {', '.join(dup)} listed more than once (give each entry its own `label`)")
        return self

    @property
    def selections(self) -> dict[str, list[str]]:
        """``{label: [member labels]}`` of every val-selected sweep, in config order (a member's
        label is that of its fits averaged over seeds)."""
        out: dict[str, list[str]] = {}
        for m in self.methods:
            if m.select_for:
                members = out.setdefault(m.select_for, [])
                if (m.seed_of or m.label) not in members:
                    members.append(m.seed_of or m.label)
        return out

    @property
    def seed_groups(self) -> dict[str, list["MethodSpec"]]:
        """``{label: [its per-seed specs]}`` when several seeds are configured, in config order."""
        out: dict[str, list[MethodSpec]] = {}
        for m in self.methods:
            if m.seed_of:
                out.setdefault(m.seed_of, []).append(m)
        return out

    @property
    def artifacts_url(self) -> str:
        return self.artifacts or os.path.join(self.output, "cache")


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key {loc!r}"
    if err["type"] == "missing":
        return f"{source}: missing config key {loc!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a config mapping; errors name the key."""
    if not isinstance(data, dict):
        raise LongtailError(f"{source}: the config must be a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise LongtailError(_format_error(source, exc)) from None


def load_config(path: str) -> RunConfig:
    """Read and validate a YAML config file. Relative paths in it stay relative to the cwd."""
    if not os.path.isfile(path):
        raise LongtailError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f.read())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise LongtailError(f"config file {path!r} is not valid YAML ({first})") from None
    return parse_config(data, source=path)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)


DEMO_METHODS: list[Union[str, dict]] = [
    "ce", "balanced-softmax", "logit-adjust", "cb-ce", "crt", "tau-norm", "lws", "cosine",
    "focal", "ldam-drw", "lade", "heuristic-cala", "dynamic-la", "ce+pc", "ce+ts", "dlsa+balanced-softmax",
    "meta-cb", "metalad", "meta-cala",
]


#: the demo fits every method with three seeds (means and 95% intervals over seeds in the report)
DEMO_SEEDS = (0, 1, 2)


def demo_config(out: str) -> RunConfig:
    """The demo: the full DAG on ``digits-lt`` with every head, the meta-learned family, ``ce+pc``, three seeds."""
    return parse_config(
        {
            "store": os.path.join(out, "features.zarr"),
            "dataset": "digits-lt",
            "backbone": {"kind": "builtin"},
            "methods": DEMO_METHODS,
            "seeds": list(DEMO_SEEDS),
            "output": out,
        },
        source="demo",
    )
