"""Checkpoints with orbax: the latest epoch (for ``--resume``) and the best-on-validation epoch.

Layout under ``workdir``::

  checkpoints/latest/<epoch>/   state + loop bookkeeping (JSON), the newest 2 kept
  checkpoints/best/<epoch>/     state + bookkeeping of the best validation epoch, 1 kept

orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; resuming loses at most the epoch in progress.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def latest_saved_epoch(workdir: str | os.PathLike) -> int | None:
  """The newest epoch under ``workdir/checkpoints/latest`` (finished saves only: orbax's temporary
  directories are not integers), ``None`` if none; reads the file system only."""
  root = os.path.join(os.fspath(workdir), "checkpoints", "latest")
  epochs = [int(e) for e in os.listdir(root) if e.isdigit()] if os.path.isdir(root) else []
  return max(epochs, default=None)


class Checkpointer:
  """Saves and restores ``(TrainState, bookkeeping dict)`` pairs keyed by epoch."""

  def __init__(self, workdir: str | os.PathLike):
    root = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    options = dict(create=True, enable_async_checkpointing=False)
    self._latest = ocp.CheckpointManager(
        os.path.join(root, "latest"), options=ocp.CheckpointManagerOptions(max_to_keep=2, **options))
    self._best = ocp.CheckpointManager(
        os.path.join(root, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

  def save(self, epoch: int, state: Any, meta: dict[str, Any], *, best: bool) -> None:
    """Saves the state after ``epoch`` as best when ``best``, then as latest.

    Best first: a run killed between the two saves resumes from the previous epoch and redoes this
    one bit-identically (orbax skips re-saving an existing best step), whereas latest-first would
    resume with bookkeeping naming this epoch as best while the best checkpoint is an older one.
    """
    managers = (self._best, self._latest) if best else (self._latest,)
    for manager in managers:
      manager.save(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      manager.wait_until_finished()

  def latest_epoch(self) -> int | None:
    return self._latest.latest_step()

  def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest ``(state, meta)``, with ``like``'s structure and shardings; ``None`` if none."""
    return self._restore(self._latest, like)

  def restore_best(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    return self._restore(self._best, like)

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, like: Any):
    epoch = manager.latest_step()
    if epoch is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])
