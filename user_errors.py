"""The base of every error that is the user's to fix, and the one line a report of any error names.

Every module raises its own subclass of UserError; the entry scripts catch UserError alone
(exit_as_promised), so a new kind of bad input needs no list kept by hand. Free of torch, so a script reports
bad input before torch is loaded.
"""
import os
import sys


class UserError(Exception):
    """Bad input from the user: reported as one line naming the file and the fix, exit code 2, no traceback."""


def first_line(err):
    """The first line of an exception's message (its type when it has none): what a one-line report names."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def launched_by_torchrun():
    """True under torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def speaks_for_job():
    """True alone and on rank 0 of a torchrun job: the process that reports what every process meets."""
    return int(os.environ.get("RANK", "0")) == 0


def stopped_job_line(err, kept):
    """The one line a process of a torchrun job prints when a collective failed (`kept`: what is safe)."""
    return f"error: process {os.environ.get('RANK', '0')} of the torchrun job stopped ({first_line(err)}): {kept}"


def exit_as_promised(main, kept):
    """Run an entry script's main() and exit with its code, or as the tool promises: 2 and one `error:` line
    for a UserError (said once under torchrun), 1 and one line when another torchrun process is lost
    (`kept`: what is safe), 130 on Ctrl-C."""
    try:
        sys.exit(main())
    except UserError as err:
        if speaks_for_job():  # under torchrun every process meets it; one says so
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # PeerLostError, or a failed collective inside DistributedDataParallel
        if not launched_by_torchrun():
            raise
        print(stopped_job_line(err, kept), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
