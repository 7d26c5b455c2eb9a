"""The shared token that authenticates a client to a device server: from a file or the environment,
never from the config (which is saved with every run) and never logged."""

from __future__ import annotations

import os
from pathlib import Path

from astraora.errors import ConfigError

TOKEN_ENV = "ASTRAORA_DEVICE_TOKEN"
MIN_TOKEN_LENGTH = 8


def read_token(token_file: str | None, key: str) -> str:
    """The token from ``token_file`` (its content, surrounding whitespace stripped) or else ``$ASTRAORA_DEVICE_TOKEN``;
    ``key`` names the config key of the file in errors."""
    if token_file:
        path = Path(str(token_file)).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"{key}={token_file} is not a readable text file.") from None
        source = f"{key}={token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            raise ConfigError(
                f"no device token: set the environment variable {TOKEN_ENV} or {key} to a file holding it."
            )
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(
            f"the device token from {source} must be at least {MIN_TOKEN_LENGTH} characters without spaces."
        )
    return token
