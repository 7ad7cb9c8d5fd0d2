"""Registration side effects: each module below registers its methods with ``@register``.

Adding a method is one module plus one line here.
"""

from stages import heads  # noqa: F401
from stages import calibrate  # noqa: F401
from stages import lade  # noqa: F401
from stages import dlsa  # noqa: F401
from stages import cala  # noqa: F401
