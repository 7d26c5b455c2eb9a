"""Errors that carry one clear line for the user."""


class AstraoraError(Exception):
    """Base class: the message is one sentence meant for the user, shown without a traceback."""


class ConfigError(AstraoraError, ValueError):
    """A config key has a value that is not allowed."""


class DatasetNotFoundError(AstraoraError, FileNotFoundError):
    """A dataset is missing and could not be downloaded."""


class DataFileError(AstraoraError):
    """A data file is unreadable, truncated or of the wrong kind; the message names the file."""


class DeviceFault(AstraoraError, RuntimeError):
    """A physical device query failed (raised by the driver or by fault injection)."""


class DeviceFailure(AstraoraError, RuntimeError):
    """A device query kept failing after all retries; training must stop."""


class PeerFailure(DeviceFailure):
    """Data-parallel training: another process stopped (killed, crashed, or failed other than by its
    device), so this one stops too: exit code 3, summary.json status ``peer_failure``."""
