"""Test session set-up: keep Prefect, matplotlib and temp files out of the home directory."""

import os
import tempfile

_ROOT = tempfile.mkdtemp(prefix="longtail-tests-")
for _var, _sub in (("PREFECT_HOME", "prefect"), ("MPLCONFIGDIR", "mpl"), ("TMPDIR", "tmp")):
    os.environ.setdefault(_var, os.path.join(_ROOT, _sub))
    os.makedirs(os.environ[_var], exist_ok=True)
tempfile.tempdir = os.environ["TMPDIR"]
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Tests fit hundreds of tiny models: one intra-op thread avoids thread start-up and contention costs
# that dominate at that size (and keeps timings sane when CI shares its cores).
import torch  # noqa: E402

torch.set_num_threads(1)
