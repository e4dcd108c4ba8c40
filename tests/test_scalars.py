import pytest

from fedtune.scalars import NO_MATCH, match_scalar


@pytest.mark.parametrize(
    ("value", "kinds", "expected"),
    [
        (1, [float], 1.0),
        (1, [int, float], 1),
        (True, [int, float], NO_MATCH),  # a bool is not a number
        (True, [bool], True),
        (None, [int, type(None)], None),
        ("x", [int, float], NO_MATCH),
        ("x", [str], "x"),
        (1.5, [int], NO_MATCH),
    ],
)
def test_match_scalar(value, kinds, expected) -> None:  # type: ignore[no-untyped-def]
    got = match_scalar(value, kinds)
    assert got is expected if expected is NO_MATCH else (got == expected and type(got) is type(expected))
