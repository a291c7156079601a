"""One page of a list, read in SQL: the rows after a cursor in the list's order, at most ``limit`` of them, and whether
more follow, in one query that reads ``limit + 1`` rows (keyset paging on the list's order, which ends in a unique
column, so a page never repeats or skips a row that was there). Every list route pages this way; none loads a key's
rows to slice them in Python."""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.serve.errors import APIError


def page_rows(db, table: str, where: str, args: Sequence, order: Sequence[str], after: str | None, limit: int,
              descending: bool = True) -> tuple[list, bool]:
    """(the rows of ``table`` matching ``where`` after the row whose id is ``after``, at most ``limit``, in ``order``
    (columns or expressions of ours, never a caller's; the last one unique), and whether more follow). An ``after``
    that names no row of the list is a 400 on ``after``, not an empty page."""
    way, beyond = ("DESC", "<") if descending else ("ASC", ">")
    keys, sql, params = ", ".join(order), f"SELECT * FROM {table} WHERE {where}", list(args)
    if after is not None:
        place = db.execute(f"SELECT {keys} FROM {table} WHERE id = ? AND {where}", [after, *args]).fetchone()
        if place is None:
            raise invalid_cursor(after)
        sql, params = f"{sql} AND ({keys}) {beyond} ({', '.join('?' * len(order))})", [*params, *place]
    sql += " ORDER BY " + ", ".join(f"{c} {way}" for c in order) + " LIMIT ?"
    rows = db.execute(sql, [*params, limit + 1]).fetchall()
    return rows[:limit], len(rows) > limit


def invalid_cursor(after: str) -> APIError:
    return APIError(400, f"after: no item with id '{after}' in this list; pass the last_id of the page you have, or "
                    "leave 'after' out to start from the first", param="after", code="invalid_cursor")
