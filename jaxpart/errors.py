"""The one base class of errors caused by what the user asked for (bad config, plan, files).

The command line prints these as `error: ...` with exit status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
  """The message names the field or path, the bad value and what would be valid."""
