"""The standard streams of an entry script: closed ones (`<&-`) read and write as /dev/null, and a reader that
leaves (`| head -1`) ends the printing, never the work: training still saves, inference still writes its file.

    guard_standard_streams()    # first in cli(): print() never raises BrokenPipeError afterwards
"""
import contextlib
import os
import sys


class PipeEndSafe:
    """A text stream whose writes stop, quietly, once the reader of its pipe has gone."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text):
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.lost()
        return len(text)

    def flush(self):
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.lost()

    def lost(self):
        self.gone = True
        # what is still buffered then goes to /dev/null, so the flush at exit does not raise it again
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer: the wrapped stream's
        return getattr(self.stream, name)


def guard_standard_streams():
    """Closed standard descriptors become /dev/null (so no file of the run gets number 0, 1 or 2, and stdin reads
    as empty), and stdout and stderr stop quietly when their reader goes."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, closefd=False))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        with contextlib.suppress(AttributeError, ValueError):  # a file name that is not UTF-8 prints as its bytes
            stream.reconfigure(errors="surrogateescape")
        if stream is not None and not isinstance(stream, PipeEndSafe):
            setattr(sys, name, PipeEndSafe(stream))
