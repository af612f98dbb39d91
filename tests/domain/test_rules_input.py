"""Names, descriptions and tags refuse NUL and the other control characters, each with
its field's ECS code, and say which character in the message without repeating it raw."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError

CONTROLS = ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\u2028", "\u2029",
            "\ud800"]


def refused(call: Callable[..., None], *args: object, **kwargs: object) -> EcsError:
    with pytest.raises(EcsError) as caught:
        call(*args, **kwargs)
    assert caught.value.http_status == 400
    return caught.value


@pytest.mark.parametrize("char", CONTROLS)
def test_control_characters_are_refused(char: str) -> None:
    error = refused(rules.check_name, f"web{char}01", code="InvalidInstanceName.Malformed")
    assert error.code == "InvalidInstanceName.Malformed"
    assert "control characters" in error.message and char not in error.message
    error = refused(rules.check_description, f"nightly{char}backup")
    assert error.code == "InvalidDescription.Malformed"
    error = refused(rules.check_description, f"nightly{char}backup",
                    code="InvalidParameter.Description")
    assert error.code == "InvalidParameter.Description"
    error = refused(rules.check_tags, {f"env{char}": "prod"})
    assert error.code == "InvalidTagKey.Malformed" and char not in error.message
    error = refused(rules.check_tags, {"env": f"prod{char}"})
    assert error.code == "InvalidTagValue.Malformed" and char not in error.message
    error = refused(rules.check_tags, {"env": char})
    assert error.code == "InvalidTagValue.Malformed"


def test_what_ecs_allows_still_passes() -> None:
    rules.check_name("数据-盘_1.bak:x", code="X")
    rules.check_description("Nightly backup, before the upgrade (数据) — ok!")
    rules.check_tags({"env": "", "owner": "team a/b", "表": "值 1"})


@given(st.text(min_size=1, max_size=40),
       st.characters(whitelist_categories=("Cc", "Cs", "Zl", "Zp")))
def test_any_control_character_anywhere_is_refused(text: str, char: str) -> None:
    value = f"ab{text}{char}"
    with pytest.raises(EcsError):
        rules.check_description(value)
    with pytest.raises(EcsError):
        rules.check_name(value, code="X")
    with pytest.raises(EcsError):
        rules.check_tags({"k": value[:128]})
