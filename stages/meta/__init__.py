"""The meta-learned re-balancing methods (meta-learning specification): their characteristics,
meta sets and heads, trained by the bi-level look-ahead step of :mod:`longtail.stages.train.bilevel`."""
