"""The error every configuration check raises, and how a run ends on it; imports nothing of the project."""
from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A bad configuration value; the message names the config key and the allowed values."""


def exit_with(err: ConfigError | str) -> NoReturn:
    """End the program as on every bad config value: ``error: <message>`` on stderr, exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
