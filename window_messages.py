"""The messages between the labeling window's Tk thread and its two worker threads (labeling_workers.py): one
small frozen record per kind, so each side dispatches on the type and every field has a name."""
from dataclasses import dataclass, make_dataclass


def message(name, *fields, doc):
    """A frozen dataclass with these fields (a field given as (name, default) is optional)."""
    cls = make_dataclass(name, fields, frozen=True)
    cls.__doc__, cls.__module__ = doc, __name__
    return cls


# --- Tk thread -> run worker: what the person did, already committed to the store -------------------------
Answered = message("Answered", "question", "answer", doc="A class (or None, a skip) for the question shown.")
VerdictGiven = message("VerdictGiven", "question", "verdict", "row",
                       doc="A yes (1) or no (0) to the question's proposed class; row: the verdict's store id.")
AnswerUndone = message("AnswerUndone", "question", doc="The person took back the answer to this question.")
VerdictUndone = message("VerdictUndone", "row", doc="The person took back the verdict with this store id.")


@dataclass(frozen=True)
class Stop:
    """Finish the running update, start no other."""


# --- workers -> Tk thread ---------------------------------------------------------------------------------
QuestionReady = message("QuestionReady", "question", doc="A question prepared to show (labeling_workers.Question).")
NoMoreQuestions = message("NoMoreQuestions", doc="This session hands out no more questions; training goes on.")
UpdateStarted = message("UpdateStarted", "number", doc="Update `number` began (None: a refit after an undo).")
UpdateDone = message("UpdateDone", "metrics", doc="The update (or refit: metrics None) finished.")
Waiting = message("Waiting", "count", doc="Answers and verdicts waiting for the next update.")
EpochDone = message("EpochDone", "epoch", doc="Epochs done so far, once another has ended.")
WorkerFailed = message("WorkerFailed", "text", ("stops_training", bool, False),
                       doc="A worker stopped; text says why and what is safe (stops_training: the run worker).")
SessionDone = message("SessionDone", "updates", doc="Every epoch is done and the checkpoint saved.")
