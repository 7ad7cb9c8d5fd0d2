"""The one exception type for user mistakes.

Anything a user can get wrong (a config key, a file, a value) raises :class:`LongtailError` with a
message that names the file, key or value. The CLI turns it into one line on stderr and exit
status 2. Bugs are allowed to raise anything else and show a traceback.
"""


class LongtailError(ValueError):
    """A user-facing error: bad input, bad config, missing or corrupt file."""
