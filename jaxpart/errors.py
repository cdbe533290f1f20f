"""The one base class of errors caused by what the user asked for (bad config, plan, files).

The command line prints these as `error: ...` with exit status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
  """The message names the field or path, the bad value and what would be valid."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, for errors from libraries whose messages run long."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]
