"""Cells of the CSV files the tool writes, made safe to open in a spreadsheet and read back unchanged.

A cell that starts with =, +, -, @, a tab or a carriage return is a formula to Excel and LibreOffice (a class
folder or file name such as `=HYPERLINK(...)` would run); OWASP's remedy is a leading `'`, which makes both read
the cell as text. A cell that starts with `'` gets one too, so that restoring is exact: every name round-trips.
"""
import csv
import io

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def neutralise(cell):
    """cell as text a spreadsheet shows and never evaluates: a leading ' where it could start a formula."""
    text = "" if cell is None else str(cell)
    return QUOTE + text if text.startswith((*FORMULA_STARTS, QUOTE)) else text


def restore(cell):
    """The text neutralise was given (a cell it did not change is returned as it is)."""
    if cell.startswith(QUOTE) and cell[1:].startswith((*FORMULA_STARTS, QUOTE)):
        return cell[1:]
    return cell


def csv_text(header, rows):
    """A header line and one line per row, every cell neutralised."""
    return "".join(csv_line([neutralise(c) for c in row]) for row in [header, *rows])


def csv_line(cells):
    """One CSV line, ended by LF. The writer quotes a cell that holds a character of its line terminator: with LF
    alone, a file name holding a bare CR would go out unquoted, and every reader would end the row there."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\r\n").writerow(cells)
    return text.getvalue()[:-2] + "\n"
