"""The expected failures: what a user can fix, which `nodulesynth <step>` reports in one line without a traceback.

- `InputError`: bad input (a config key, a file's content, a command's argument); the message names the file or
  key. A missing file is Python's own FileNotFoundError, whose message names the path.
- `DeviceError`: a job cannot have the device it needs; the message says why and what to do.

Anything else that escapes a command is a surprise, and its traceback is what finds it.
"""


class InputError(KeyError, ValueError):
    """Bad input, named by file or key in the message: `InputError("cohort.source must be ...")`.

    Also a KeyError and a ValueError, the types nodulesynth raised for bad input before this class: callers that
    catch those (and tests that expect them) keep working."""

    def __str__(self):
        # KeyError's str() would quote the message as a repr
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class DeviceError(RuntimeError):
    """A job cannot have the device it needs; the message says why and what to do."""
