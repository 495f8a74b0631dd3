"""Find the small regions that changed between a patient's scans across visits."""

import os
from importlib.metadata import PackageNotFoundError, version

# torch's OpenMP threads spin while waiting; on a shared 2-core machine that made encoding 3-5x slower.
# It must be set before torch is first imported, so it lives here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("longitudinal")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
