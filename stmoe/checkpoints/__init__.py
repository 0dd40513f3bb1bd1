"""Checkpoints: the orbax manager (save, verify, resume), where checkpoints live, and the export format.

* :mod:`stmoe.checkpoints.manager` -- periodic async saves, checksums, keep-N, safe resume, restores;
* :mod:`stmoe.checkpoints.resolve` -- a run dir / step dir / export dir -> what to read and its config.gin;
* :mod:`stmoe.checkpoints.export` -- the inference export format (`stmoe export`) and loading a model + params
  from any checkpoint kind.

`from stmoe import checkpoints` gives the manager's API (as before this became a package).
"""

from stmoe.checkpoints.manager import (  # noqa: F401
    DATA_ITEM, INTEGRITY_FILE, QUARANTINE_SUBDIR, STEP_CONFIG_FILE, CheckpointManager, CheckpointWarning,
    CorruptCheckpointError, check_fits, differences, has_integrity, restore_params, restore_train_state,
    verify_integrity, write_integrity)
from stmoe.checkpoints.resolve import (  # noqa: F401
    CHECKPOINTS_SUBDIR, STATE_ITEM, CheckpointLocation, latest_step_dir)
