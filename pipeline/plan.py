"""The schedule of the method stage, for the flow and for sequential runs: the distinct shared
artifacts to build first (each once, as a task of its own), the methods with no wrapper (heads,
independent of each other), then the wrapped methods, which reuse cached fits."""

from __future__ import annotations

from dataclasses import dataclass

from longtail.pipeline.config import MethodSpec, RunConfig
from longtail.pipeline.methods import build_method, inner_spec
from longtail.pipeline.requirements import RequirementResult, requirement_ident, run_requirement
from longtail.pipeline.stores import StoreInfo


@dataclass(frozen=True)
class RequirementRef:
    """One distinct shared artifact, by the configured spec that first declares it and its position
    in that method's ``requirements()`` (plain data: it travels to task workers)."""

    spec: MethodSpec
    index: int
    kind: str
    ident: str


@dataclass
class MethodPlan:
    requirements: list[RequirementRef]
    heads: list[MethodSpec]
    #: spec label -> idents of the artifacts its method declares (its task waits for them)
    needs: dict[str, list[str]]
    wrapped: list[MethodSpec]


def method_plan(cfg: RunConfig) -> MethodPlan:
    refs: dict[str, RequirementRef] = {}
    needs: dict[str, list[str]] = {}
    for spec in cfg.methods:
        method, _ = build_method(cfg, spec)
        needs[spec.label] = []
        for i, req in enumerate(method.requirements()):
            ident = requirement_ident(req)
            refs.setdefault(ident, RequirementRef(spec, i, req.kind, ident))
            needs[spec.label].append(ident)
    heads = [s for s in cfg.methods if inner_spec(s) is None]
    return MethodPlan(requirements=list(refs.values()), heads=heads, needs=needs,
                      wrapped=[s for s in cfg.methods if inner_spec(s) is not None])


def run_requirement_ref(cfg: RunConfig, ref: RequirementRef, store: StoreInfo,
                        force: bool = False) -> RequirementResult:
    """Build (or reuse) the shared artifact ``ref`` names."""
    req = build_method(cfg, ref.spec)[0].requirements()[ref.index]
    return run_requirement(cfg, req, store, force=force)
