"""Registration side effects: each module below registers its methods with ``@register``.

Adding a method is one module plus one line here.
"""

from longtail.stages import heads  # noqa: F401
from longtail.stages import calibrate  # noqa: F401
from longtail.stages import lade  # noqa: F401
from longtail.stages import dlsa  # noqa: F401
from longtail.stages import cala  # noqa: F401
