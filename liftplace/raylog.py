"""What every worker process of a liftplace Ray job sets up at start (Ray's worker_process_setup_hook).

Ray Train's controller logs, with a full traceback, an error raised while it writes the run's
own state to storage (a full disk under --out, say) before the run fails with that error. The
driver says that failure in one line (its cause and the resume command) and writes the error in
full to the run's error.txt where it can, so the controller's copy on the console is dropped:
only for file system errors (OSError); any other error of the controller keeps its traceback.
This module imports nothing heavy: every worker process runs it.
"""

from __future__ import annotations

import logging

CONTROLLER_LOGGER = "ray.train.v2._internal.execution.controller.controller"


class _FileSystemErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and record.getMessage().startswith("Error in control loop iteration"))


def setup() -> None:
    logger = logging.getLogger(CONTROLLER_LOGGER)
    if not any(isinstance(f, _FileSystemErrors) for f in logger.filters):
        logger.addFilter(_FileSystemErrors())
