"""A private X server for the window tests and the latency benchmark (never used by the tool itself).

Xvfb picks a free display number itself (-displayfd), so parallel runs never collide.
"""
import os
import select
import subprocess


class XvfbError(RuntimeError):
    """Xvfb did not start."""


class XvfbDisplay:
    """A running Xvfb; `display` is the DISPLAY value (':N'). Use as a context manager or call stop()."""

    def __init__(self, screen="1280x1024x24", timeout=30):
        self._read, write = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", screen, "-nolisten", "tcp"],
                                     pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write)
        number = b""
        while not number.endswith(b"\n") and select.select([self._read], [], [], timeout)[0]:
            chunk = os.read(self._read, 64)  # Xvfb writes the number once it accepts connections
            if not chunk:
                break
            number += chunk
        if not number.strip().isdigit():
            self.stop()
            raise XvfbError(f"Xvfb did not report a display number ({number!r})")
        self.display = ":" + number.decode().strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._read is not None:
            os.close(self._read)  # only now: Xvfb dies of SIGPIPE if it writes to a closed pipe
            self._read = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
