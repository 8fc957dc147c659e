"""Find runs that a dead job left RUNNING, and mark them KILLED.

    python -m src.runs stale                   # list them, in the default store
    python -m src.runs stale --mark-killed     # and end each one KILLED
    python -m src.runs stale --tracking-uri http://127.0.0.1:5000 --older-than 30

A job ends its run itself on success, errors, Ctrl-C and SIGTERM. A job killed
with SIGKILL, or on a node that died, cannot: its run stays RUNNING. A RUNNING run
is stale when:

- its job, or for a sweep's parent run its sweep, ran on this host (tag
  ``process.host``) and that process is gone (tag ``process.pid``, with
  ``process.start_ticks`` to see through a reused pid);
- or, for runs from other hosts and runs without those tags, nothing was
  logged for ``--older-than`` minutes (default 60).

Exit status: 0 when no stale run is left unmarked, 1 when stale runs were found
and not marked, 2 for a bad argument or an unreachable store.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.config import UserError
from src.tracking import process_start_ticks, redact_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "vanishing-gradients"
# A per-epoch key of every training run: its last timestamp is when the run was last active.
ACTIVITY_KEY = "time/epoch_seconds"


@dataclass
class StaleRun:
    run_id: str
    run_name: str
    experiment: str
    reason: str


def process_alive(pid: int, start_ticks: int | None) -> bool:
    """Tell whether process `pid` on this host still runs and is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if start_ticks is None:
        return True
    return process_start_ticks(pid) == start_ticks


def last_activity_ms(client: MlflowClient, run) -> int:
    """Return when run `run` last logged a per-epoch metric, or its start, in ms since the epoch."""
    if ACTIVITY_KEY in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, ACTIVITY_KEY)
        if history:
            return max(m.timestamp for m in history)
    return run.info.start_time


def why_stale(
    client: MlflowClient, run, host: str, now_ms: int, older_than_min: float
) -> str | None:
    """Return why a RUNNING run is stale, or None if it may still be running."""
    tags = run.data.tags
    pid = tags.get("process.pid")
    if tags.get("process.host") == host and pid is not None:
        ticks = tags.get("process.start_ticks")
        if process_alive(int(pid), int(ticks) if ticks else None):
            return None
        return f"its process {pid} on {host} is gone"
    idle_min = (now_ms - last_activity_ms(client, run)) / 60_000
    if idle_min >= older_than_min:
        return f"nothing logged for {idle_min:.0f} min"
    return None


def find_stale_runs(
    client: MlflowClient, experiment_names: list[str] | None, older_than_min: float
) -> list[StaleRun]:
    """Return the stale RUNNING runs of the named experiments (every experiment by default)."""
    if experiment_names:
        experiments = []
        for name in experiment_names:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise UserError(
                    f"No experiment named {name!r} in this store. Leave out --experiment to "
                    "search every experiment."
                )
            experiments.append(experiment)
    else:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    names = {e.experiment_id: e.name for e in experiments}
    if not names:
        return []
    runs = client.search_runs(
        list(names), filter_string="attributes.status = 'RUNNING'", max_results=50_000
    )
    host, now_ms = os.uname().nodename, int(time.time() * 1000)
    stale = []
    for run in runs:
        reason = why_stale(client, run, host, now_ms, older_than_min)
        if reason is not None:
            stale.append(
                StaleRun(run.info.run_id, run.info.run_name, names[run.info.experiment_id], reason)
            )
    return stale


def mark_killed(client: MlflowClient, run: StaleRun) -> None:
    client.set_tag(run.run_id, "stale.reason", run.reason)
    client.set_terminated(run.run_id, "KILLED")


def stale_main(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    stale = find_stale_runs(client, args.experiment, args.older_than)
    if not stale:
        print(f"No stale runs in {redact_uri(uri)}.")
        return 0
    for run in stale:
        if args.mark_killed:
            mark_killed(client, run)
        action = "marked KILLED" if args.mark_killed else "stale"
        print(f"{run.run_id}  {run.experiment}/{run.run_name}: {action}, {run.reason}")
    if args.mark_killed:
        print(f"Marked {len(stale)} run(s) KILLED in {redact_uri(uri)}.")
        return 0
    print(f"{len(stale)} stale run(s); add --mark-killed to end them KILLED.")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.runs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stale = commands.add_parser("stale", help="list RUNNING runs whose job is gone")
    stale.add_argument(
        "--tracking-uri",
        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlruns/)",
    )
    stale.add_argument(
        "--experiment", action="append", help="only this experiment (repeat for more)"
    )
    stale.add_argument(
        "--older-than",
        type=float,
        default=60.0,
        metavar="MINUTES",
        help="idle time after which a run from another host counts as stale (default 60)",
    )
    stale.add_argument("--mark-killed", action="store_true", help="end each stale run KILLED")
    stale.set_defaults(handler=stale_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "older_than", 0) < 0:
        print(f"error: --older-than {args.older_than}: expected minutes >= 0", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: the tracking store failed: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
