"""What the labeling window draws of the person's answers: the class bars under the image, the chart at the
bottom, and the class-balance test that colours both. Each class draws on a canvas the window made; no torch."""
import math

LOPSIDED_AFTER = 20  # answers before a class under half its fair share is worth a warning
LOPSIDED_CHANCE = 0.01  # ... and only a count that low by chance less often than this (lopsided())
BAR_ROW = 20        # pixels per class in the bars under the image
RED, BLUE = "#b00020", "#1565c0"


def lopsided(counts, min_answers=LOPSIDED_AFTER, chance=LOPSIDED_CHANCE):
    """Classes under half their fair share (total / number of classes) once min_answers are given, when
    answers this uneven would come by less than `chance` were the classes equally likely: the counts as a
    whole (chi-square) or one class this short (binomial, chance / classes each). With many classes and few
    answers one class is often short by luck alone; the chance test keeps the warning for real imbalance."""
    total, k = sum(counts), len(counts)
    low = [c for c, n in enumerate(counts) if n < 0.5 * total / k]
    if total < min_answers or not low:
        return []
    short = any(binomial_cdf(counts[c], total, 1 / k) < chance / k for c in low)
    return low if short or chi_square_tail(counts) < chance else []


def binomial_cdf(x, n, p):
    """P(X <= x) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))


def chi_square_tail(counts):
    """P-value of the counts against equal shares: the chi-square statistic's upper tail, k - 1 degrees of
    freedom, by the Wilson-Hilferty cube-root normal approximation (no SciPy for one number)."""
    k, expected = len(counts), sum(counts) / len(counts)
    stat, df = sum((n - expected) ** 2 for n in counts) / expected, k - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def balance_warning(counts, names):
    """A line when the person's answers leave a class under half its fair share (often an ordering
    problem: the images coming class by class), else ''."""
    low = lopsided(counts)
    if not low:
        return ""
    named = ", ".join(f"{names[c]}: {counts[c]}" for c in low[:3]) + (" ..." if len(low) > 3 else "")
    return (f"warning: answers lopsided: {named} of {sum(counts)} (fair share {sum(counts) / len(counts):.0f})"
            " · images in class order? · c: chart per class")


class GuessBars:
    """The model's guess (or proposal) in a label, and per class on a canvas its probability and the
    person's answers so far; --blind hides the model's side."""

    def __init__(self, canvas, label, names, blind, verdicts):
        self.canvas, self.label, self.names, self.blind, self.verdicts = canvas, label, names, blind, verdicts
        self.shown = None  # (question, counts) drawn last, drawn again when the width changes
        canvas.bind("<Configure>", lambda event: self.resize(event.width))

    def columns(self, width):
        """Side by side in two columns when there are many classes and room: the image keeps the height
        they would take."""
        return 2 if len(self.names) > 5 and width >= 760 else 1

    def resize(self, width):
        """The columns follow the window's width, and the canvas's height the columns."""
        height = BAR_ROW * -(-len(self.names) // self.columns(width)) + 4
        if int(self.canvas["height"]) != height:
            self.canvas.configure(height=height)  # the image canvas follows, and its photo is fitted again
        if self.shown:
            self.draw(*self.shown)

    def clear(self):
        self.shown = None
        self.canvas.delete("all")
        self.label.configure(text="")

    def draw(self, q, counts):
        """Question q's guess, its probabilities, and `counts`, the person's answers per class."""
        self.shown = q, counts
        top = q.proposed if self.verdicts else int(q.probs.argmax())
        self.describe(q, top)
        b = self.canvas
        b.delete("all")
        width = max(b.winfo_width(), 400)
        columns = self.columns(width)
        rows, low = -(-len(self.names) // columns), set(lopsided(counts))
        for c, p in enumerate(map(float, q.probs)):
            x0, y = width // columns * (c // rows), 2 + BAR_ROW * (c % rows)
            right = x0 + width // columns - 10
            n = counts[c]
            b.create_text(x0 + 12, y + 9, anchor="w", text=f"{c}  {self.names[c][:14]}")
            b.create_text(right, y + 9, anchor="e", text=f"{n} answer{'' if n == 1 else 's'}",
                          fill=RED if c in low else "#555555")
            if self.blind:
                continue
            start, end = x0 + 130, right - 150
            b.create_rectangle(start, y + 3, end, y + 16, outline="#bbbbbb")
            b.create_rectangle(start, y + 3, start + max(1, (end - start) * p), y + 16, width=0,
                               fill=BLUE if c == top else "#90a4ae")
            b.create_text(end + 8, y + 9, anchor="w", text=f"{p:6.1%}")

    def describe(self, q, top):
        if self.blind:
            self.label.configure(text="the model's guess is hidden (--blind)")
        elif self.verdicts:
            self.label.configure(text=f"Is it  {self.names[top]}?   y yes · n no · 0-{len(self.names) - 1} the right "
                                      "class", fg="#0d47a1")
        else:
            self.label.configure(text=f"model's guess: {top} {self.names[top]}  ({q.probs[top]:.0%}, policy "
                                      f"v{q.version})")


class AnswerChart:
    """The chart at the bottom: the model's agreement with the person over time (in verdict mode the
    person's yes to its proposals), or after key c the person's answers per class."""

    def __init__(self, canvas, names, verdicts, recent):
        self.canvas, self.names, self.verdicts, self.recent = canvas, names, verdicts, recent
        self.view = "agreement"  # or "share"
        self.shown = None  # (record, counts) drawn last, drawn again on a resize or a toggle
        canvas.bind("<Configure>", lambda event: self.redraw())

    def toggle(self):
        """The other view; returns its name."""
        self.view = "share" if self.view == "agreement" else "agreement"
        self.redraw()
        return self.view

    def draw(self, record, counts):
        """record: 1 where the model agreed (or the person said yes), oldest first; counts: answers per class."""
        self.shown = record, counts
        self.redraw()

    def redraw(self):
        c = self.canvas
        c.delete("all")
        if self.shown:
            w, h = max(c.winfo_width(), 200), int(c["height"])
            (self.draw_share if self.view == "share" else self.draw_agreement)(w, h)

    def draw_agreement(self, w, h):
        """Two lines over the answers: the agreement of the last `recent` and of all so far, above chance."""
        c, agree = self.canvas, self.shown[0]
        n = len(agree)
        what = "your yes to its proposals over verdicts" if self.verdicts else "agreement with you over answers"
        c.create_text(8, 4, anchor="nw", font=("TkDefaultFont", 9), fill="#444444",
                      text=f"{what}:  blue last {self.recent} · grey overall · dashed chance   (c: answers per class)")
        x0, x1, y0, y1 = 40, w - 10, 20, h - 6
        c.create_rectangle(x0, y0, x1, y1, outline="#cccccc")
        for v in (0.0, 0.5, 1.0):
            c.create_text(x0 - 4, y1 - v * (y1 - y0), anchor="e", font=("TkDefaultFont", 8), text=f"{v:.0%}")
        chance = y1 - (y1 - y0) / len(self.names)
        c.create_line(x0, chance, x1, chance, dash=(4, 3), fill="#999999")
        if n < 2:
            return
        stride, recent, overall, total = max(1, n // (x1 - x0)), [], [], 0
        for i, a in enumerate(agree):
            total += a
            if i % stride == 0 or i == n - 1:
                x, window = x0 + (x1 - x0) * i / (n - 1), agree[max(0, i - self.recent + 1):i + 1]
                recent += [x, y1 - (y1 - y0) * sum(window) / len(window)]
                overall += [x, y1 - (y1 - y0) * total / (i + 1)]
        c.create_line(*overall, fill="#9e9e9e", width=2)
        c.create_line(*recent, fill=BLUE, width=2)

    def draw_share(self, w, h):
        """One column per class: its share of the person's answers, beside the fair share and half of it."""
        c, counts = self.canvas, self.shown[1]
        total, k, low = sum(counts), len(counts), set(lopsided(counts))
        c.create_text(8, 4, anchor="nw", font=("TkDefaultFont", 9), fill="#444444",
                      text=f"your {total} answers per class:  dashed fair share · dotted half of it, the warning "
                           f"line after {LOPSIDED_AFTER} answers   (c: agreement)")
        x0, x1, y0, y1 = 40, w - 10, 20, h - 18
        scale = max([2 / k] + [n / total for n in counts if total])  # the tallest column, or twice the fair share
        c.create_rectangle(x0, y0, x1, y1, outline="#cccccc")
        for v in (0.0, scale):
            c.create_text(x0 - 4, y1 - v / scale * (y1 - y0), anchor="e", font=("TkDefaultFont", 8), text=f"{v:.0%}")
        step = (x1 - x0) / k
        for cls, n in enumerate(counts):
            left, share = x0 + cls * step, n / total if total else 0.0
            c.create_rectangle(left + 3, y1 - share / scale * (y1 - y0), left + step - 3, y1, width=0,
                               fill=RED if cls in low else BLUE)
            c.create_text(left + step / 2, y1 + 2, anchor="n", font=("TkDefaultFont", 8),
                          text=f"{self.names[cls][:10]}: {n}")
        for share, dash in ((1 / k, (4, 3)), (0.5 / k, (1, 3))):
            y = y1 - share / scale * (y1 - y0)
            c.create_line(x0, y, x1, y, dash=dash, fill="#555555")
