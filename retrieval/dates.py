"""Dates that users type (`--after`, `--before`, the server's parameters) as periods of wall-clock seconds.

A date names a period: "2019" the year, "2019-05" the month, "2019-05-04" the day, "2019-05-04T10:30" the
minute. Seconds are wall-clock seconds, as the index stores them (see `blipsearch.indexer.metadata`): the
time a clock showed, counted from 1970-01-01 as if it ran on UTC. No zone is accepted, since the stored
dates have none.
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta

from .errors import FieldError

FORMS = "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]"
# ASCII digits only (re.ASCII): "١٢٣٤" (Arabic-Indic digits) was the year 1234
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?)?)?", re.ASCII)
_EPOCH = datetime(1970, 1, 1)


def parse_date(text: str, field: str) -> tuple[int, int]:
    """The period `text` names, as [start, end) wall-clock seconds; raises `FieldError(field, ...)`."""
    if not isinstance(text, str):
        raise FieldError(field, f"must be a date as text: {FORMS} (got {text!r})")
    match = _DATE.fullmatch(text.strip())
    if match is None:
        raise FieldError(field, f"must be a date: {FORMS} (got {text!r})")
    try:  # untyped parts: month and day 1, time 0
        start = datetime(*(int(part or default) for part, default in zip(match.groups(), "011000", strict=True)))
    except (ValueError, OverflowError):  # month 13, February 30th, hour 24, year 0
        raise FieldError(field, f"is not a valid date: {text!r}") from None
    try:
        end = _next(start, match.lastindex)
    except (ValueError, OverflowError):  # the year 9999's periods end after the last date Python knows
        end = datetime.max
    return _seconds(start), _seconds(end)


def date_range(after: str | None, before: str | None) -> tuple[int | None, int | None]:
    """[low, high) wall-clock bounds: `after` keeps dates from the start of its period on (inclusive),
    `before` keeps dates before the start of its period, so "--after 2019 --before 2020" is the year 2019
    and "--before 2019-05" ends with April 30th. None leaves that side open; an empty range is an error."""
    low = parse_date(after, "after")[0] if after is not None else None
    high = parse_date(before, "before")[0] if before is not None else None
    if low is not None and high is not None and low >= high:
        raise FieldError("before", f"must be a later date than the start ({after}): nothing is from "
                                   f"{format_date(low)} on and before {format_date(high)}")
    return low, high


def format_date(seconds: int) -> str:
    """Wall-clock seconds as "2019-05-04T10:11:12" (no zone: the stored dates have none)."""
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()


def _next(start: datetime, typed: int) -> datetime:
    """The start of the next period; its unit is the last part `typed` (1 year, 2 month, 3 day, 5 minute, 6 second)."""
    if typed == 1:
        return start.replace(year=start.year + 1)
    if typed == 2:
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + {3: timedelta(days=1), 5: timedelta(minutes=1), 6: timedelta(seconds=1)}[typed]


def _seconds(moment: datetime) -> int:
    return calendar.timegm(moment.timetuple())
