"""Open the Optuna storage of a study, and clear trials whose worker process is gone."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lisa_tune.errors import InputError

logger = logging.getLogger(__name__)

DATABASE = "study.db"
HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 90
"""A RUNNING trial without a heartbeat for this long is failed by the next worker (any machine)."""
WORKER_ATTR = "worker"
SCHEMA_ATTEMPTS = 4


def default_url(run_dir: Path) -> str:
    """Return the SQLite URL of the study database in ``run_dir``."""
    return f"sqlite:///{(run_dir / DATABASE).resolve()}"


def masked(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<the --storage URL>"


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password  # type: ignore[return-value]
    except Exception:
        return None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Connect to an Optuna RDB storage with heartbeats, or raise ``InputError`` naming the URL without password."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        # Fail in seconds, not minutes, when the server cannot be reached.
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    # Heartbeats are marked experimental; they are what fails the trials of a killed worker.
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=GRACE_SECONDS,
                    )
            except Exception as error:
                # Workers started together on a new database race to create Optuna's tables; the loser finds
                # them made and succeeds on the next attempt.
                if "already exists" not in str(error) or attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")
    except ImportError as error:
        raise InputError(
            f"cannot open the study storage {masked(url)}: its database driver is not installed ({error}). For "
            "PostgreSQL run: pip install 'lisa-tune[postgres]'."
        ) from None
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        reason = reason.split(" (Background on this error")[0]
        secret = _password(url)
        if secret:
            reason = reason.replace(secret, "***")
        if len(reason) > 300:
            reason = reason[:300] + "..."
        if url.startswith("sqlite"):
            advice = "Check that the folder of the database file exists and is writable"
        else:
            advice = "Check that the server is running and reachable and that the URL, user and database are right"
        raise InputError(
            f"cannot open the study storage {masked(url)}: {reason}. {advice}, or leave --storage out to keep the "
            "study in a SQLite file in the run directory."
        ) from None


def _process_start(pid: int) -> str | None:
    """Return the start time of process ``pid`` in clock ticks since boot (Linux), or None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19]


def worker_identity() -> dict[str, Any]:
    """Return what identifies this process on this machine, stored on each trial it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _alive(identity: dict[str, Any]) -> bool:
    pid = int(identity.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    recorded = identity.get("start")
    # A recycled process id is a different process.
    return recorded is None or _process_start(pid) in (None, recorded)


def fail_orphaned_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[optuna.trial.FrozenTrial]:
    """Mark FAIL the RUNNING trials of dead workers; return them so their configurations can run again.

    A worker on this machine is dead when its process is gone. Trials of workers on other machines are failed by
    Optuna's heartbeat check, which every worker runs before each trial, once they have been silent for
    ``GRACE_SECONDS``.
    """
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    failed: list[optuna.trial.FrozenTrial] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        identity = trial.user_attrs.get(WORKER_ATTR)
        if not identity or identity.get("host") != host or _alive(identity):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            logger.warning(
                "trial %d was left running by process %s, which is gone; marked failed and queued again",
                trial.number,
                identity.get("pid"),
            )
            failed.append(trial)
    return failed
