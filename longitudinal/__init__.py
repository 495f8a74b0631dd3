"""Find the small regions that changed between a patient's scans across visits."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("longitudinal")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
