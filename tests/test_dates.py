"""User-typed dates as periods of wall-clock seconds, against calendar.timegm worked out per case."""

from calendar import timegm

import pytest

from blipsearch.retrieval.dates import date_range, format_date, parse_date
from blipsearch.retrieval.errors import FieldError


def wall(*parts: int) -> int:
    return timegm((*parts, 0, 0, 0, 0, 0, 0)[:6])


@pytest.mark.parametrize("text, start, end", [
    ("2019", wall(2019, 1, 1), wall(2020, 1, 1)),
    ("2019-05", wall(2019, 5, 1), wall(2019, 6, 1)),
    ("2019-12", wall(2019, 12, 1), wall(2020, 1, 1)),  # December ends in the next year
    ("2019-02", wall(2019, 2, 1), wall(2019, 3, 1)),
    ("2020-02", wall(2020, 2, 1), wall(2020, 3, 1)),  # 29 days in a leap year
    ("2020-02-29", wall(2020, 2, 29), wall(2020, 3, 1)),
    ("2019-12-31", wall(2019, 12, 31), wall(2020, 1, 1)),
    ("2019-05-04", wall(2019, 5, 4), wall(2019, 5, 5)),
    ("2019-05-04T10:30", wall(2019, 5, 4, 10, 30), wall(2019, 5, 4, 10, 31)),
    ("2019-05-04 10:30", wall(2019, 5, 4, 10, 30), wall(2019, 5, 4, 10, 31)),
    ("2019-05-04T23:59:59", wall(2019, 5, 4, 23, 59, 59), wall(2019, 5, 5)),
    (" 1969-07-20 ", wall(1969, 7, 20), wall(1969, 7, 21)),  # before 1970: negative seconds
])
def test_a_date_names_its_whole_period(text, start, end):
    assert parse_date(text, "after") == (start, end)


@pytest.mark.parametrize("text", ["May 2019", "19", "2019-5", "2019/05/04", "2019-05-04T10", "2019-05-04T10:30Z",
                                  "2019-05-04T10:30+02:00", "", "today", "\u0661\u0662\u0663\u0664"])
def test_other_forms_are_refused_with_the_accepted_ones_shown(text):
    with pytest.raises(FieldError) as caught:
        parse_date(text, "after")
    assert caught.value.field == "after"
    assert caught.value.problem == f"must be a date: YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (got {text!r})"
    assert str(caught.value).startswith("after must be a date")


@pytest.mark.parametrize("text", ["2019-00", "2019-13", "2019-02-29", "2019-04-31", "2019-05-32", "0000",
                                  "2019-05-04T24:00", "2019-05-04T10:60"])
def test_impossible_dates_are_refused(text):
    with pytest.raises(FieldError, match=f"^before is not a valid date: '{text}'$") as caught:
        parse_date(text, "before")
    assert caught.value.field == "before"


def test_the_last_year_python_knows_is_a_date():
    """Its end lies past 9999-12-31, once refused as "not a valid date": it ends with the last moment instead."""
    assert parse_date("9999", "before")[0] == wall(9999, 1, 1)
    assert parse_date("9999-12-31", "after")[1] > wall(9999, 12, 31, 23, 59)
    assert date_range("2019", "9999") == (wall(2019, 1, 1), wall(9999, 1, 1))


def test_after_keeps_its_period_and_before_stops_at_the_start_of_its_own():
    assert date_range("2019", "2020") == (wall(2019, 1, 1), wall(2020, 1, 1))  # the year 2019
    assert date_range(None, "2019-05") == (None, wall(2019, 5, 1))  # up to April 30th
    assert date_range("2019-05-04", None) == (wall(2019, 5, 4), None)
    assert date_range("2019-05-04T10:30", "2019-05-04T10:31") == (wall(2019, 5, 4, 10, 30), wall(2019, 5, 4, 10, 31))
    assert date_range(None, None) == (None, None)


@pytest.mark.parametrize("after, before", [("2020", "2019"), ("2019-05-04", "2019-05-04"), ("2019-05", "2019")])
def test_an_empty_range_is_blamed_on_before(after, before):
    with pytest.raises(FieldError) as caught:
        date_range(after, before)
    assert caught.value.field == "before"
    assert str(caught.value).startswith(f"before must be a later date than the start ({after}): ")


def test_the_empty_range_message_shows_both_bounds():
    with pytest.raises(FieldError) as caught:
        date_range("2019-05-04", "2019-05")
    assert caught.value.problem == ("must be a later date than the start (2019-05-04): nothing is from "
                                    "2019-05-04T00:00:00 on and before 2019-05-01T00:00:00")


def test_a_bad_bound_names_its_own_field():
    with pytest.raises(FieldError) as caught:
        date_range("2019", "soon")
    assert caught.value.field == "before"
    with pytest.raises(FieldError) as caught:
        date_range("2019-13", "2020")
    assert caught.value.field == "after"


@pytest.mark.parametrize("text", ["2019-05-04T10:11:12", "2020-02-29T00:00:00", "1969-12-31T23:59:59",
                                  "2100-12-31T23:59:59"])
def test_format_date_reads_back(text):
    assert format_date(parse_date(text, "after")[0]) == text


def test_format_date_shows_wall_clock_without_a_zone():
    assert format_date(wall(2019, 5, 4, 10, 11, 12)) == "2019-05-04T10:11:12"
    assert format_date(-1) == "1969-12-31T23:59:59"
