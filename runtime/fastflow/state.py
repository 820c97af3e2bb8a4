"""The FastFlow bandit state file: schema, migration, lock and atomic replace.

One JSON document per (grid, model identity): schema ``anchorflow.fastflow-bandit``, version
:data:`VERSION`. Version 1 files (fixed mu, no budget, no guard) are migrated on read: their
bandit keeps its fixed mu (``adapt=False``) and every reward counts as paid (``R = N``).
Version 2 files (one table, the skip residual as the reward) read as version 3 with
``reward="residual"`` and no context; the next save writes version 3. Version 3 adds
``reward`` and ``context``: None (one table, a :class:`FastFlowBandit`) or ``{"by", "groups"}``
with ``tables`` {context name: its mu, counts, history and generator} (a
:class:`~.context.ContextBandits`); an unknown context kind or a table name that spec cannot
make is refused. A newer version, another schema or a malformed table is refused
with a message that says what to do. Writers hold ``<path>.lock`` (filelock) for the whole
read-modify-write and replace the file atomically (:mod:`anchorflow.base._io`), so concurrent
processes never lose an update and a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ...base._io import write_json
from ...base.errors import ConfigError, StateFileError
from .bandit import HISTORY, BanditKey, FastFlowBandit
from .context import CONTEXT_KINDS, ContextBandits

SCHEMA = "anchorflow.fastflow-bandit"
VERSION = 3
LOCK_TIMEOUT_S = 120.0
LOCK_NOTICE_S = 1.0  # wait this long in silence before saying that another process holds the lock


def _table(b: FastFlowBandit) -> dict[str, Any]:
    """What one context's table learned (the settings are the document's)."""
    return {"mu": b.mu, "generations": b.generations, "history": b.history,
            "Q": b.Q.tolist(), "N": b.N.tolist(), "R": b.R.tolist(), "rng": b.rng.bit_generator.state}


def to_dict(b: FastFlowBandit | ContextBandits) -> dict[str, Any]:
    """The version-3 document of a bandit (or of context bandits: the template's settings, the
    context spec and every context's table)."""
    if isinstance(b, ContextBandits):
        return {**_plain(b.template), "context": b.spec(), "tables": {c: _table(t) for c, t in b.tables.items()}}
    return _plain(b)


def _plain(b: FastFlowBandit) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "key": {"T": b.T, "grid": b.grid.tolist(), "grid_sha256": b.key.grid_sha256, "model_id": b.key.model_id},
        "arms": list(b.arms), "gamma": b.gamma, "bonus": b.bonus,
        "budget": {"target_calls": b.target, "eta": b.eta},
        "mu": b.mu, "mu_factor": b.mu_factor, "tol": b.tol, "seed": b.seed,
        "generations": b.generations, "history": b.history,
        "Q": b.Q.tolist(), "N": b.N.tolist(), "R": b.R.tolist(),
        "rng": b.rng.bit_generator.state,
        "reward": b.reward_mode, "context": None,
    }


def _bad(source: str, what: str) -> StateFileError:
    return StateFileError(
        f"{source} is not a usable FastFlow bandit state ({what}); delete it to start learning afresh "
        "or restore a good copy"
    )


def migrate(d: dict, source: str) -> dict:
    """Bring an older document up to :data:`VERSION` (v1: fixed mu, no budget, every reward paid)."""
    version = d.get("version")
    if version == VERSION:
        return d
    if version == 1:
        d = dict(d, version=2, budget={"target_calls": None, "eta": None}, tol=None, history=[])
        d["R"] = d.get("N")
        version = 2
    if version == 2:  # one table, charged the skip residual
        return dict(d, version=3, reward="residual", context=None)
    if isinstance(version, int) and version > VERSION:
        raise StateFileError(f"{source} was written by a newer anchorflow (bandit state version {version}); "
                             f"this one reads versions 1..{VERSION}: upgrade anchorflow or use another state file")
    raise _bad(source, f"schema version {version!r}; this anchorflow reads versions 1..{VERSION}")


def _matrix(d: dict, name: str, shape: tuple[int, int], dtype: type, source: str) -> np.ndarray:
    try:
        m = np.asarray(d[name], dtype=dtype)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise _bad(source, f"missing or non-numeric {name}") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise _bad(source, f"{name} must be a finite {shape[0]}x{shape[1]} table, got shape {m.shape}")
    return m


def from_dict(d: Any, source: str = "bandit state") -> FastFlowBandit | ContextBandits:
    """Rebuild a bandit (or context bandits) from a (possibly older) document; anything malformed
    -> StateFileError."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        found = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise _bad(source, f"schema {found!r}, expected {SCHEMA!r}")
    d = migrate(d, source)
    b = _bandit(d, source)
    spec = d.get("context", "missing")
    if spec is None:
        return b
    if not isinstance(spec, dict) or spec.get("by") not in CONTEXT_KINDS:
        found = spec.get("by") if isinstance(spec, dict) else spec
        raise _bad(source, f"unknown context {found!r}; this anchorflow knows {', '.join(CONTEXT_KINDS)}")
    tables = d.get("tables")
    if not isinstance(tables, dict):
        raise _bad(source, "context bandits without a tables mapping")
    try:  # the spec is checked as a new ContextBandits' would be, every table name against it
        cb = ContextBandits(b.T, b.grid, model_id=b.key.model_id, by=spec["by"], groups=spec.get("groups"))
        for name in tables:
            cb.check_name(name)
    except (KeyError, TypeError, ConfigError) as exc:
        raise _bad(source, f"unknown context: {exc}") from None
    cb.template = b
    for name, t in tables.items():
        if not isinstance(t, dict):
            raise _bad(source, f"table {name!r} is not a mapping")
        table = b.copy()
        _fill(table, t, f"{source}, table {name!r}")
        cb.tables[name] = table
    return cb


def _bandit(d: dict, source: str) -> FastFlowBandit:
    try:
        key, budget = d["key"], d["budget"]
        adapt = budget["target_calls"] is not None
        b = FastFlowBandit(int(key["T"]), key["grid"], model_id=str(key["model_id"]), arms=d["arms"],
                           gamma=d["gamma"], mu=d["mu"], seed=int(d["seed"]), bonus=d["bonus"],
                           mu_factor=d["mu_factor"], tol=d["tol"], adapt=adapt,
                           calls=budget["target_calls"] if adapt else None,
                           eta=budget["eta"] if adapt else 0.3, reward=d["reward"])
    except (KeyError, TypeError, ValueError, OverflowError, ConfigError) as exc:
        raise _bad(source, f"bad or missing field: {exc}") from None
    if adapt and not 0 < b.eta <= MAX_ETA:  # a huge eta drove mu to inf on the next update
        raise _bad(source, f"budget.eta must be in (0, {MAX_ETA:g}], got {b.eta!r}")
    if b.key.grid_sha256 != key.get("grid_sha256"):
        raise _bad(source, "grid hash does not match its grid values")
    _fill(b, d, source)
    return b


def _fill(b: FastFlowBandit, d: dict, source: str) -> None:
    """What ``b`` learned, from ``d``: mu, generations, history, generator, Q / N / R."""
    try:
        b.mu = None if d["mu"] is None else float(d["mu"])
        b.generations = int(d["generations"])
        b.history = [[float(c), None if m is None else float(m)] for c, m in d["history"]][-HISTORY:]
        b.rng.bit_generator.state = d["rng"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _bad(source, f"bad or missing field: {exc}") from None
    if b.mu is not None and not (np.isfinite(b.mu) and b.mu >= 0):
        raise _bad(source, f"mu must be a finite number >= 0, got {b.mu!r}")
    shape = (b.T, len(b.arms))
    b.Q = _matrix(d, "Q", shape, np.float64, source)
    b.N = _matrix(d, "N", shape, np.int64, source)
    b.R = _matrix(d, "R", shape, np.int64, source)
    if b.N.min() < 0 or b.generations < 0 or np.any(b.R < 0) or np.any(b.R > b.N):
        raise _bad(source, "negative counts, or more paid rewards R than pulls N")


def read(path: str | os.PathLike) -> Any:
    """The JSON document at ``path`` (StateFileError when missing, unreadable or corrupt)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StateFileError(f"{path} does not exist; run fastflow with this --bandit-state to create it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(str(path), f"unreadable: {exc}") from None
    # nesting, huge integers and garbage refused by the one defensive JSON reader
    from ...base._io import parse_json
    from ...base.errors import CheckpointError

    try:
        return parse_json(text, path)
    except CheckpointError as exc:
        raise _bad(str(path), f"corrupt or truncated JSON: {str(exc).replace(f'{path} ', '', 1)}") from None


def load(path: str | os.PathLike, key: Optional[BanditKey] = None, context: Optional[dict] = None,
         contexts: bool = False) -> FastFlowBandit | ContextBandits:
    """Read a state file; refuse a corrupt or foreign one, or one whose key differs from ``key``.

    ``context``: the :meth:`ContextBandits.spec` a run asks for; a file of another spec (or of one
    table, no context) is refused. Without it, a file of context bandits is refused unless
    ``contexts`` (callers that drive one table: the CLI, ``solve_with_state``, the diffusers hook)."""
    b = from_dict(read(path), str(path))
    if context is not None:
        have = b.spec() if isinstance(b, ContextBandits) else None
        if have != context:
            raise StateFileError(f"{path} holds bandits for context {have!r}, not {context!r}; use another "
                                 "state file for this context, or delete it to learn afresh")
    elif isinstance(b, ContextBandits) and not contexts:
        raise StateFileError(f"{path} holds context bandits ({b.spec()}, {len(b.tables)} tables), which this "
                             "command does not use; give a state file of one bandit table")
    if key is not None:
        diffs = b.key.differences(key)
        if diffs:
            raise StateFileError(
                f"{path} holds bandit state for another setup ({'; '.join(diffs)}); "
                "use a different state file for this model and grid, or delete it to learn afresh"
            )
    return b


def load_for_model(path: str | os.PathLike, model: str, want: str) -> FastFlowBandit:
    """:func:`load`, refusing the state of a model other than MODEL, whose identity is ``want``
    (:func:`anchorflow.runtime.bundles.models.model_identity`, computed by the caller: this room does
    not open bundles). ``bandit show`` must not present another model's state as this one's; the
    state's key is the model's identity, plus its guidance when sampled with cfg."""
    b = load(path)
    have = b.key.model_id.split("|", 1)[0]
    if have != want:
        raise StateFileError(
            f"{path} is the bandit state of another model (weights {have[:12]}), not of {model} "
            f"(weights {want[:12]}); give the file that 'anchorflow sample {model} --solver fastflow "
            "--bandit-state FILE' wrote"
        )
    return b


MAX_ETA = 10.0  # log mu moves by at most eta x the relative calls error per generation


def write(b: FastFlowBandit, path: str | os.PathLike) -> None:
    """Replace ``path`` atomically with the version-3 document (caller holds the lock)."""
    from_dict(json.loads(json.dumps(to_dict(b))), f"{path} (the updated state, not written)")
    try:
        write_json(path, to_dict(b))
    except OSError as exc:
        raise StateFileError(f"cannot write the bandit state {path}: {exc.strerror or exc}") from None


# -- concurrency ----------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class state_lock:
    """Context manager: hold ``<path>.lock`` while reading-modifying-writing ``path``.

    If another process holds it, say so (``notify``, default stderr) after
    :data:`LOCK_NOTICE_S`, then wait up to ``timeout`` seconds and fail with a message.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S,
                 notify: Callable[[str], None] = _stderr) -> None:
        from filelock import FileLock

        self.path, self.timeout, self.notify = path, float(timeout), notify
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateFileError(f"cannot create the folder of the bandit state {path}: {exc.strerror or exc}") from None
        self.lock = FileLock(f"{os.fspath(path)}.lock")

    def __enter__(self) -> "state_lock":
        from filelock import Timeout

        try:
            try:
                self.lock.acquire(timeout=min(LOCK_NOTICE_S, self.timeout))
            except Timeout:
                self.notify(f"waiting for the bandit state lock {self.lock.lock_file} (held by another process; "
                            f"giving up after {self.timeout:g} s)")
                self.lock.acquire(timeout=max(self.timeout - LOCK_NOTICE_S, 0.0))
        except Timeout:
            raise StateFileError(
                f"{self.path} is locked by another process (lock file {self.lock.lock_file}) for over "
                f"{self.timeout:g} s; wait for it to finish, or remove the lock file if no process uses it"
            ) from None
        except OSError as exc:
            raise StateFileError(f"cannot lock the bandit state {self.path}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


def update(path: str | os.PathLike, fn: Callable[[FastFlowBandit], None], *, key: Optional[BanditKey] = None,
           create: Optional[Callable[[], FastFlowBandit]] = None, timeout: float = LOCK_TIMEOUT_S) -> FastFlowBandit:
    """Read-modify-write under the lock: load ``path`` (or ``create()`` it), apply ``fn``, save.

    Concurrent callers are serialised, so every update lands. Returns the saved bandit.
    """
    with state_lock(path, timeout):
        b = create() if create is not None and not Path(path).exists() else load(path, key=key)
        fn(b)
        write(b, path)
    return b
