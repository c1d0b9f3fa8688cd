"""The sequence every training stage follows: validate, then open the run folder, then train.

``run_in_folder`` is shared by the teacher stage, the transfer stage and the pipelines' stages, so the
order cannot drift between them:

1. a new run is validated and its config resolved (``prepare_new``) *before* anything is written;
2. the run folder is opened on the main process (``RunFolder.open``: lock, ``--overwrite`` moves the old run
   aside, ``--resume`` checks the saved config), every process receiving the resolved config;
3. the body trains; the first checkpoint or state it writes deletes an overwritten run (``on_saved``);
4. however the body ends (finished, failed, Ctrl-C/SIGTERM) is recorded in ``run.json`` and the lock
   released; an overwritten run comes back when the new one wrote nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dmlkd.config.convert import from_dict, to_dict
from dmlkd.engine.run_record import drop_state, is_complete
from dmlkd.engine.rundir import RunFolder, check_can_open, sigterm_as_interrupt
from dmlkd.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


def run_in_folder(
    out: str | Path,
    stage: str,
    *,
    resume: bool,
    overwrite: bool,
    given: dict[str, Any] | None,
    device: str,
    prepare_new: Callable[[], dict[str, Any]],
    body: Callable[[dict[str, Any], Path, Callable[[], None]], T],
    on_saved: Callable[[], None] | None = None,
) -> T:
    """Run ``body(config_tree, run_dir, on_saved)`` in the run folder ``out`` (see the module docstring)."""
    from dmlkd.engine.distributed import call_on_main, init_processes, launched

    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite contradict each other: --resume continues the run in --out, "
            "--overwrite replaces it; pass one of them"
        )
    if not resume:  # a folder that cannot take the run is named before the (slower) validation
        # Decided by the main process where the process group already exists (a pipeline's later stages): a
        # process that gets here after the main one has opened the folder would see its own run and refuse.
        call_on_main(check_can_open, out, stage, resume=False, overwrite=overwrite, given={})
    tree = None if resume else prepare_new()  # every check that needs no training, before any write
    if launched():
        init_processes(device)
    opened: dict[str, RunFolder] = {}

    def open_folder() -> dict[str, Any]:
        folder = RunFolder.open(out, stage, tree or {}, resume=resume, overwrite=overwrite, given=given)
        opened["folder"] = folder
        return folder.tree

    resolved = call_on_main(open_folder)
    folder = opened.get("folder")
    if folder is None:  # another process of a launched run: the main process owns the folder
        return body(resolved, Path(out), lambda: None)

    def saved() -> None:
        folder.saved()
        if on_saved is not None:
            on_saved()

    with sigterm_as_interrupt(), folder.active():
        return body(resolved, folder.path, saved)


def run_stage(
    config: Any,
    out: str | Path,
    stage: str,
    *,
    prepare: Callable[[Any], Any],
    train: Callable[..., T],
    finished: Callable[[Path], T],
    resume: bool,
    overwrite: bool,
    given: dict[str, Any] | None,
    on_saved: Callable[[], None] | None,
) -> T:
    """A training stage from a typed config: ``run_teacher`` and ``run_transfer`` are this with their parts.

    ``prepare(config)`` validates and returns an object whose ``config`` has the dataset's defaults filled
    in; ``train(config, run_dir, resume=, prepared=, on_saved=)`` trains; ``finished(run_dir)`` is the result
    of a run that has finished and dropped its state (``--resume`` then has nothing to do). A finished run
    drops ``state/`` unless ``train.keep_state``.
    """
    from dmlkd.engine.distributed import is_main

    prepared: dict[str, Any] = {}

    def prepare_new() -> dict[str, Any]:
        prepared["new"] = prepare(config)
        return to_dict(prepared["new"].config)

    def body(tree: dict[str, Any], run_dir: Path, saved: Callable[[], None]) -> T:
        if resume and is_complete(run_dir):
            log.warning("the run in %s has finished; nothing to do", run_dir)
            return finished(run_dir)
        ready = prepared.get("new") or prepare(from_dict(type(config), tree))
        result = train(ready.config, run_dir, resume=resume, prepared=ready, on_saved=saved)
        if is_main() and not ready.config.train.keep_state:
            drop_state(run_dir)
        return result

    return run_in_folder(
        out,
        stage,
        resume=resume,
        overwrite=overwrite,
        given=given,
        device=config.train.device,
        prepare_new=prepare_new,
        body=body,
        on_saved=on_saved,
    )
