"""Experiment trackers (MLflow, Weights & Biases): each run's config, curves, final metrics and sample grids.

A tracker is handed to ``results.RunFolder``, the one writer of a run's folder, and sees what
it writes: ``start`` (the run's config), ``log`` (each reported row, and the checkpoint it came
with), ``end``. One tracker run per run folder -- a study's variant and seed, a ``liftplace
distill`` run -- named after it (``<variant>-seed<k>``), in an experiment (a W&B project) named
after the study; the step is the run's own training step; the flattened config goes in as
parameters, the curves under TensorBoard's names (``results.CURVES``), the final FID, KID,
precision and recall as ``final_*`` metrics, the final sample grid as an artifact (a W&B
image). The run folder keeps the tracker run's id and the last step it logged
(``tracker.json``): a resumed run goes on in the same tracker run, and a step it already logged
is not logged again.

Written by the driver of a study (``runner.runs.RunFolders``) or, for ``liftplace distill``,
by Ray Train's controller: one writer per tracker run. Nothing is written where the user did
not say: MLflow's store is ``--tracker-uri``, else MLFLOW_TRACKING_URI, else a SQLite file in
the study's folder (``mlflow.db``; a SQLite store's artifacts beside it, ``mlflow-artifacts/``);
W&B writes offline runs under the study's folder (``wandb/``, for ``wandb sync``) unless
WANDB_MODE=online. Both are optional extras; ``check`` refuses a tracker that is not installed,
a store that cannot be written or reached, or W&B online without an API key, in one line,
before any run starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from liftplace import files
from liftplace.dotted import flatten
from liftplace.results import CURVES, EVAL_COLUMNS, RUN_CONFIG, RunFolder

TRACKERS = ("mlflow", "wandb")
TRACKER_FILE = "tracker.json"  # in a run folder: {kind: {"run_id", "last_step", "last_eval", "ended", ...}}
SERVER_TIMEOUT_S = 10  # how long check() waits for an MLflow tracking server


def make_tracker(kind: str | None, uri: str | None, experiment: str, folder: Path) -> Tracker | None:
    """The tracker a command line asked for (None: none), for the study (or run) in ``folder``;
    refused in one line (ValueError) when it cannot be used."""
    if kind is None:
        if uri is not None:
            raise ValueError("--tracker-uri names a tracker's store: add --tracker mlflow")
        return None
    if kind not in TRACKERS:
        raise ValueError(f"--tracker {kind!r}: choose one of {', '.join(TRACKERS)}")
    if kind == "wandb":
        if uri is not None:
            raise ValueError("--tracker-uri is MLflow's store; W&B writes offline runs under the study's folder, "
                             "or to its server with WANDB_MODE=online (WANDB_BASE_URL, WANDB_API_KEY)")
        tracker = WandbTracker(experiment, Path(folder).resolve())
    else:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"
        tracker = MlflowTracker(uri, experiment)
    tracker.check()
    return tracker


def send_runs(folders: list[Path], tracker: Tracker) -> None:
    """Send a study's run folders (or a `liftplace distill` folder) to a tracker as they are:
    before a study resumes with one, so that its finished runs are sent too, and what an
    earlier tracker failure left unsent (each run's writer sends the rows its tracker run lacks)."""
    for path in folders:
        writer = RunFolder(path, tracker)
        writer.start(json.loads((Path(path) / RUN_CONFIG).read_text()), writer.who())


class Tracker:
    """What both trackers share: which run folder is which tracker run, what a row sends, and
    which steps were sent. A backend makes its runs (``_create``, ``_reopen``), sends metrics
    (``_send``) and grids (``_grid``), and ends a run (``_finish``). Picklable: a backend's
    client or open runs belong to the process that made them (the Tune driver's callback is
    pickled with the study's Tuner; ``liftplace distill`` sends its writer to Ray Train's
    controller), and another process re-opens a run from the run folder's tracker.json."""

    kind = ""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self._runs: dict[str, dict] = {}  # run folder -> its tracker.json entry, and "handle", "ended"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._runs = {}

    def start(self, folder: Path, config: dict, who: dict | None) -> None:
        """Open the run folder's tracker run: a new one, or its own again (a resumed run; a
        finished run's stays finished, as when a study is resumed with a tracker only so that
        its runs are sent)."""
        state = self._open(Path(folder), config, who)
        if state.pop("reopened", False) and not state["ended"]:
            self._running(state)

    def _open(self, folder: Path, config: dict | None = None, who: dict | None = None) -> dict:
        key = str(folder)
        if key in self._runs:
            return self._runs[key]
        saved = _read_tracker_file(folder).get(self.kind, {})
        if saved.get("run_id") and self._same_store(saved):
            # A run that ended FINISHED stays so; one that failed or was stopped goes on.
            state = {**saved, "handle": self._reopen(folder, saved), "reopened": True,
                     "ended": saved.get("ended") if saved.get("ended") == "FINISHED" else False}
        else:
            if config is None:  # start() was called on the folder, in this process or another
                config = json.loads((folder / RUN_CONFIG).read_text())
            run_id, handle = self._create(folder, dict(flatten(config)), _tags(folder, config, who))
            state = {**self._store(), "run_id": run_id, "last_step": -1, "last_eval": -1, "ended": False,
                     "handle": handle}
            self._save(folder, state)
        state["folder"] = key
        self._runs[key] = state
        return state

    def _save(self, folder: Path, state: dict) -> None:
        entry = {k: v for k, v in state.items() if k not in ("handle", "folder", "reopened")}
        files.write_text(folder / TRACKER_FILE, json.dumps({**_read_tracker_file(folder), self.kind: entry}, indent=2) + "\n")

    def log(self, folder: Path, row: dict, checkpoint: Path | None, final: bool) -> None:
        """One reported row: its curves unless its step was logged (a resumed run re-reports
        the steps after its checkpoint), its evaluation unless one was logged at that step or
        later (a final step reported unevaluated, then evaluated on resume, gets its FID), its
        checkpoint's sample grid; at the run's last row its final metrics, and the tracker run
        ends FINISHED."""
        folder = Path(folder)
        state = self._open(folder)
        step = int(row["step"])
        evaluated = _number(row.get("fid")) and step > state["last_eval"]
        values = {tag: float(row[c]) for c, tag in CURVES.items() if _number(row.get(c))
                  and (evaluated if c in EVAL_COLUMNS else step > state["last_step"])}
        if final and not state["ended"]:
            values.update({f"final_{c}": float(row[c]) for c in EVAL_COLUMNS if _number(row.get(c))})
        if values:
            self._send(state, step, values, final)
        grid = Path(checkpoint) / "samples.png" if checkpoint else None
        if grid is not None and grid.is_file():
            self._grid(state, step, grid)
        if step > state["last_step"] or evaluated:
            state["last_step"] = max(state["last_step"], step)
            state["last_eval"] = step if evaluated else state["last_eval"]
            self._save(folder, state)
        if final and not state["ended"]:
            self.end(folder, "FINISHED")

    def end(self, folder: Path, status: str) -> None:
        """End the run's tracker run: FINISHED, FAILED (its trial failed) or KILLED (stopped
        before its last step), once; tracker.json keeps how it ended."""
        folder = Path(folder)
        if not (folder / TRACKER_FILE).is_file() and str(folder) not in self._runs:
            return  # never opened: nothing to end
        state = self._open(folder)
        if not state["ended"]:
            self._finish(state, status)
            state["ended"] = status
            self._save(folder, state)

    # What a backend provides.
    def check(self) -> None:
        """Refuse, in one line (ValueError), a tracker that cannot be used; write nothing."""
        raise NotImplementedError

    def where(self) -> str:
        """Where the runs go, for the console."""
        raise NotImplementedError

    def _store(self) -> dict:
        """What tracker.json keeps of the store a run went to (MLflow: its URI)."""
        return {}

    def _same_store(self, saved: dict) -> bool:
        return True

    def _create(self, folder: Path, params: dict, tags: dict):
        """A new tracker run: (its id, this process's handle of it or None)."""
        raise NotImplementedError

    def _reopen(self, folder: Path, saved: dict):
        """This process's handle of a run made before (or None)."""
        raise NotImplementedError

    def _running(self, state: dict) -> None:
        """A run made before trains again."""

    def _send(self, state: dict, step: int, values: dict, final: bool) -> None:
        raise NotImplementedError

    def _grid(self, state: dict, step: int, path: Path) -> None:
        raise NotImplementedError

    def _finish(self, state: dict, status: str) -> None:
        raise NotImplementedError


class MlflowTracker(Tracker):
    """One MLflow run per run folder, through ``mlflow.MlflowClient`` (no global active run, so
    that one driver logs every trial's runs at once)."""

    kind = "mlflow"

    def __init__(self, uri: str, experiment: str):
        super().__init__(experiment)
        self.uri = uri
        self._client = None

    def __setstate__(self, state):
        super().__setstate__(state)
        self._client = None

    def where(self) -> str:
        uri = _redacted(self.uri)
        return f"mlflow at {uri} (experiment {self.experiment!r}; mlflow ui --backend-store-uri {uri})"

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            # MLflow's INFO lines (a new SQLite store's "Creating initial MLflow database tables...")
            # would land among the study's progress lines.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _local_file(self) -> Path | None:
        """A SQLite store's file (``sqlite:///relative`` or ``sqlite:////absolute``)."""
        return Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None

    def check(self) -> None:
        """Refuse an MLflow that is not installed, a local store that cannot be written, or a URI
        MLflow cannot use (a server is asked for one experiment). Writes nothing: the experiment
        is made when the first run starts."""
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("--tracker mlflow: MLflow is not installed (pip install -e '.[mlflow]')")
        local = self._local_file()
        if local is not None:
            files.check_writable(local.parent, "--tracker-uri")
            return
        # A tracking server that does not answer is refused in seconds, not after MLflow's
        # retries (which the runs keep: a passing error mid-study is retried).
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(SERVER_TIMEOUT_S)}
        before = {k: os.environ.get(k) for k in quick}
        os.environ.update({k: os.environ.get(k, v) for k, v in quick.items()})
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 -- MLflow's errors are many; each ends in this one line
            text = " ".join(str(err).split())
            password = urlsplit(self.uri).password
            text = text.replace(password, "***") if password else text  # MLflow's error names the URI
            raise ValueError(f"--tracker-uri {_redacted(self.uri)}: MLflow cannot use it: "
                             f"{type(err).__name__}: {text[:300]}") from None
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _store(self) -> dict:
        return {"uri": _redacted(self.uri)}  # no password in a run folder

    def _same_store(self, saved: dict) -> bool:
        return saved.get("uri") == _redacted(self.uri)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # A SQLite store's artifacts go beside its file (MLflow's own default is ./mlruns under
        # whatever folder the command ran in); a server's, where the server says.
        local = self._local_file()
        return self.client.create_experiment(
            self.experiment, artifact_location=(local.parent / "mlflow-artifacts").resolve().as_uri() if local else None)

    def _create(self, folder: Path, params: dict, tags: dict):
        from mlflow.entities import Param

        run_id = self.client.create_run(self._experiment_id(), run_name=folder.name, tags=tags).info.run_id
        entries = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(entries), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(run_id, params=entries[i:i + 100])
        return run_id, None

    def _reopen(self, folder: Path, saved: dict):
        return None

    def _running(self, state: dict) -> None:
        self.client.update_run(state["run_id"], status="RUNNING")

    def _send(self, state: dict, step: int, values: dict, final: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(state["run_id"], metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _grid(self, state: dict, step: int, path: Path) -> None:
        self.client.log_artifact(state["run_id"], str(path), artifact_path=f"samples/step-{step:07d}")

    def _finish(self, state: dict, status: str) -> None:
        self.client.set_terminated(state["run_id"], status=status)


class WandbTracker(Tracker):
    """One W&B run per run folder (``wandb.init(reinit="create_new")``: one driver holds every
    trial's runs at once), its x axis the run's training step (``train/step``, so that a step
    can be sent in any order). Offline (WANDB_MODE unset) under ``<study>/wandb/``; ``wandb sync``
    uploads it later."""

    kind = "wandb"

    def __init__(self, experiment: str, folder: Path):
        super().__init__(experiment)
        self.folder = Path(folder)
        self.mode = os.environ.get("WANDB_MODE", "offline")

    def where(self) -> str:
        return (f"wandb {self.mode}, project {self.experiment!r}"
                + (f", runs under {self.folder / 'wandb'} (upload: wandb sync {self.folder / 'wandb'})"
                   if self.mode == "offline" else ""))

    def check(self) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--tracker wandb: W&B is not installed (pip install -e '.[wandb]')")
        if self.mode not in ("offline", "online"):
            raise ValueError(f"--tracker wandb: WANDB_MODE={self.mode!r}; use offline (the default) or online")
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise ValueError("--tracker wandb with WANDB_MODE=online needs WANDB_API_KEY (W&B's API key) in the "
                             "environment; or leave WANDB_MODE unset for offline runs")
        files.check_writable(self.folder, "--tracker wandb")

    def _run(self, state: dict):
        """The W&B run, opened in the process that first sends to it (not where it was only
        started: `liftplace distill` starts it in its driver and logs from Ray Train's
        controller, and one W&B run has one writer), with the run folder's config."""
        if state["handle"] is None:
            import wandb

            folder = Path(state["folder"])
            config = json.loads((folder / RUN_CONFIG).read_text())
            os.environ.setdefault("WANDB_SILENT", "true")
            self.folder.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=_project(self.experiment), name=folder.name, id=state["run_id"], resume="allow",
                             dir=str(self.folder), mode=self.mode, config=dict(flatten(config)), reinit="create_new",
                             tags=[f"{k.split('.')[-1]}={v}"[:64] for k, v in _tags(folder, config, None).items()],
                             settings=wandb.Settings(silent=True, console="off"))
            run.define_metric("train/step")
            run.define_metric("*", step_metric="train/step")
            state["handle"] = run
        return state["handle"]

    def _store(self) -> dict:
        return {"mode": self.mode}  # an offline run resumed online is another W&B run

    def _same_store(self, saved: dict) -> bool:
        return saved.get("mode") == self.mode

    def _create(self, folder: Path, params: dict, tags: dict):
        return uuid.uuid4().hex[:12], None

    def _reopen(self, folder: Path, saved: dict):
        return None

    def _send(self, state: dict, step: int, values: dict, final: bool) -> None:
        run = self._run(state)
        run.log({"train/step": step, **values})
        if final:
            run.summary.update({k: v for k, v in values.items() if k.startswith("final_")})

    def _grid(self, state: dict, step: int, path: Path) -> None:
        import wandb

        self._run(state).log({"train/step": step, "samples": wandb.Image(str(path), caption=f"step {step}")})

    def _finish(self, state: dict, status: str) -> None:
        if state["handle"] is None and status != "FINISHED":
            # Not opened in this process (`liftplace distill`'s driver, after its controller
            # failed): opening it only to end it would give the run a second writer.
            return
        self._run(state).finish(exit_code=0 if status in ("FINISHED", "KILLED") else 1)
        state["handle"] = None
        if not any(other["handle"] is not None for other in self._runs.values()):
            # This process's W&B service is stopped now, not at exit: Ray ends the process that
            # logged a `liftplace distill` run (its Train controller) after the service, and W&B's
            # exit hook then printed a traceback into the console.
            import wandb

            wandb.teardown()


def _tags(folder: Path, config: dict, who: dict | None) -> dict:
    """Who a run is, for the tracker: its folder's name, variant and seed (a study's run.json;
    a `liftplace distill` run: its objective and seed)."""
    who = who if who is not None else RunFolder(folder).who() or {}
    variant = who.get("variant", config.get("objective", {}).get("name"))
    seed = who.get("seed", config.get("train", {}).get("seed"))
    return {"liftplace.run": folder.name, "liftplace.variant": str(variant), "liftplace.seed": str(seed)}


def _redacted(uri: str) -> str:
    """A store's URI without its password (``scheme://user:***@host``), to print and to keep."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _project(name: str) -> str:
    """A W&B project name: the study's, without the characters W&B refuses there."""
    return "".join("-" if c in '/\\#?%:' else c for c in name)[:128]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_tracker_file(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / TRACKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
