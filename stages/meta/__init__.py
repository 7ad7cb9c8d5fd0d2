"""The meta-learned re-weighting family (papers 003, 000, 001; specification ``meta-learning.md``):
meta sets (:mod:`.metaset`) and the heads trained by the bi-level look-ahead step of
:mod:`longtail.stages.train.bilevel`."""

from longtail.stages.meta.cala import MetaCALAHead  # noqa: F401
from longtail.stages.meta.jamal import MetaCBHead  # noqa: F401
from longtail.stages.meta.metalad import MetaLADHead  # noqa: F401
from longtail.stages.meta.metaset import (  # noqa: F401
    META_SOURCES,
    MetaSet,
    build_meta_set,
    meta_set_requirement,
    select_meta_rows,
    split_for_fit,
)
