"""The one base class of errors caused by what the user asked for (bad config, plan, files).

The command line prints these as `error: ...` with exit status 2; anything else is a bug and
keeps its traceback.
"""

import _thread
import sys
import threading


class UserError(ValueError):
  """The message names the field or path, the bad value and what would be valid."""


def check_positive_ints(owner: str, error: type[UserError], **values) -> None:
  """Each value a positive int (not a bool), else `error` naming `owner.name`: the one wording
  of this check for the frozen settings of plans, pools, steps and schedulers."""
  for name, v in values.items():
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise error(f"{owner}.{name} = {v!r}: must be a positive integer")


def first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, for errors from libraries whose messages run long."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


def keep_interrupts() -> None:
  """Ctrl-C that lands in a callback whose exceptions Python ignores (JAX's garbage-collection
  callback runs often, during imports and tracing) would be printed as an unraisable traceback
  and lost, the command running on. Such an interrupt is delivered again, to the main code."""
  hook = sys.unraisablehook
  if getattr(hook, "_jaxpart_keeps_interrupts", False):
    return

  def redeliver(unraisable):
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
      # from another thread, so that it lands after this hook has returned
      threading.Timer(0.01, _thread.interrupt_main).start()
    else:
      hook(unraisable)
  redeliver._jaxpart_keeps_interrupts = True
  sys.unraisablehook = redeliver
