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
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([neutralise(c) for c in header])
    writer.writerows([[neutralise(c) for c in row] for row in rows])
    return text.getvalue()
