"""Run configuration: a YAML file validated by pydantic.

The config contract (other tools write it)::

    store: runs/demo/features.zarr      # URL of the feature store (fsspec; a local path by default)
    dataset: digits-lt                  # or {name: digits-lt, imbalance_ratio: 20}; omit if the store is complete
    backbone: {kind: builtin}           # optional; builtin | torchscript | python
    methods: [ce, {name: logit-adjust, params: {tau: 1.0}}, ce+pc]
    output: runs/demo                   # run directory (report, metrics.json)

Optional keys: ``seed`` (feeds every generator), ``device`` (auto | cpu | cuda[:N]),
``artifacts`` (URL of the artifact cache, default ``OUTPUT/cache``), ``evaluation``
(many/few thresholds, shot-group rule, ECE bins), ``extraction`` (batch size, chunk rows).
An unknown key anywhere is an error that names the key.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.errors import LongtailError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    name: str = "digits-lt"
    imbalance_ratio: float = Field(20.0, ge=1.0)
    test_per_class: int = Field(50, ge=1)
    val_per_class: int = Field(20, ge=1)


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
    # python
    target: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    classifier: str | None = None

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


class MethodSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name


class RunConfig(_Strict):
    store: str
    dataset: DatasetConfig | None = None
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    methods: list[MethodSpec] = Field(min_length=1)
    output: str
    artifacts: str | None = None
    seed: int = 0
    device: str = "auto"
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _unique_methods(self) -> "RunConfig":
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: {', '.join(dup)} listed more than once")
        return self

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
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise LongtailError(f"config file {path!r} is not valid YAML ({first})") from None
    return parse_config(data, source=path)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)


DEMO_METHODS: list[Union[str, dict]] = [
    "ce", "balanced-softmax", "logit-adjust", "cb-ce", "crt", "tau-norm", "lws", "cosine",
    "focal", "ldam-drw", "lade", "ce+pc", "ce+ts", "dlsa+balanced-softmax",
]


def demo_config(out: str) -> RunConfig:
    """The demo: the full DAG on ``digits-lt`` with every head and ``ce+pc``."""
    return parse_config(
        {
            "store": os.path.join(out, "features.zarr"),
            "dataset": "digits-lt",
            "backbone": {"kind": "builtin"},
            "methods": DEMO_METHODS,
            "output": out,
        },
        source="demo",
    )
