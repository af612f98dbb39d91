"""The README's list of supported actions is the API's table of actions, no more, no less."""

from __future__ import annotations

import re
from pathlib import Path

from ecsnap.entrypoints.api.actions import ACTIONS

README = Path(__file__).parents[1] / "README.md"
BEGIN, END = "<!-- actions: begin -->", "<!-- actions: end -->"


def readme_actions() -> list[str]:
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{BEGIN} … {END} in README.md"
    block = text[text.index(BEGIN):text.index(END)]
    return re.findall(r"`([A-Z][A-Za-z]+)`", block)


def test_readme_lists_exactly_the_supported_actions() -> None:
    listed = readme_actions()
    assert len(listed) == len(set(listed)), "an action is listed twice"
    missing, unknown = sorted(set(ACTIONS) - set(listed)), sorted(set(listed) - set(ACTIONS))
    assert not missing and not unknown, (
        f"README.md lists actions ecsnap does not have: {unknown}; and misses: {missing}. "
        f"Between {BEGIN} and {END}, list each of: {', '.join(sorted(ACTIONS))}")
