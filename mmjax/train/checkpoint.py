"""Checkpoints with orbax: the latest epoch (for ``--resume``) and the best-on-validation epoch.

Layout under ``workdir``::

  checkpoints/latest/<epoch>/   state + loop bookkeeping (JSON), the newest 2 kept
  checkpoints/best/<epoch>/     state + bookkeeping of the best validation epoch, 1 kept

orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; resuming loses at most the epoch in progress. With
``async_save`` the latest checkpoint is written in the background while training goes on (the next
save, a restore or ``close`` waits for it); a kill during it loses that epoch's checkpoint, never the
previous one. Several processes (``jax.distributed``) save and restore together through orbax's
multi-process path. Each
checkpoint carries the SHA-256 of its state; a restore that fails, mismatches it or holds non-finite
values falls back to the previous checkpoint (:meth:`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def latest_saved_epoch(workdir: str | os.PathLike, kind: str = "latest") -> int | None:
  """The newest epoch (step for ``kind="interrupted"``) under ``workdir/checkpoints/<kind>``
  (finished saves only: orbax's temporary directories are not integers), ``None`` if none; reads
  the file system only."""
  root = os.path.join(os.fspath(workdir), "checkpoints", kind)
  epochs = [int(e) for e in os.listdir(root) if e.isdigit()] if os.path.isdir(root) else []
  return max(epochs, default=None)


def state_checksum(state: Any) -> str:
  """SHA-256 of every leaf of ``state`` (shape, dtype and bytes, in tree order; PRNG keys by their
  key data), saved beside each checkpoint and compared on restore."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.shape}{leaf.dtype}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


class Checkpointer:
  """Saves and restores ``(TrainState, bookkeeping dict)`` pairs keyed by epoch; every restore is
  verified (see :meth:`restore_latest`)."""

  def __init__(self, workdir: str | os.PathLike, async_save: bool = False):
    self.root = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    self.async_save = async_save
    options = dict(create=True, enable_async_checkpointing=False)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.root, "latest"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, **dict(options, enable_async_checkpointing=async_save)))
    self._best = ocp.CheckpointManager(
        os.path.join(self.root, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
    # The state after the step at which a signal stopped the run, keyed by that step.
    self._interrupted = ocp.CheckpointManager(
        os.path.join(self.root, "interrupted"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

  def save(self, epoch: int, state: Any, meta: dict[str, Any], *, best: bool) -> None:
    """Saves the state after ``epoch`` as best when ``best``, then as latest; ``meta`` gets the
    state's :func:`state_checksum`.

    Best first: a run killed between the two saves resumes from the previous epoch and redoes this
    one bit-identically (orbax skips re-saving an existing best step), whereas latest-first would
    resume with bookkeeping naming this epoch as best while the best checkpoint is an older one.
    """
    meta = dict(meta, checksum=state_checksum(state))
    managers = (self._best, self._latest) if best else (self._latest,)
    for manager in managers:
      manager.save(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      if manager is not self._latest or not self.async_save:
        manager.wait_until_finished()

  def latest_epoch(self) -> int | None:
    return self._latest.latest_step()

  def restore_latest(self, like: Any, log: Callable[[str], None] = print
                     ) -> tuple[Any, dict[str, Any]] | None:
    """The newest usable ``(state, meta)``, with ``like``'s structure and shardings; ``None`` if
    there is no checkpoint.

    Usable = orbax restores it, its checksum matches the one saved with it, and its float leaves
    are finite. An unusable latest checkpoint (truncated, zeroed, corrupt JSON, a deleted item, a
    flipped bit) is logged, deleted (the epochs after the one restored are redone and saved again)
    and the previous one (orbax keeps two) is tried. A checkpoint whose saved arrays (shapes and
    dtypes, by orbax's metadata) are not those of ``like`` is not damaged but foreign: it is refused,
    and nothing is deleted.

    Raises:
      ValueError: checkpoints exist but none is usable (naming the directory and each reason), or
        the latest one holds a state of another structure.
    """
    self._latest.wait_until_finished()
    reasons = []
    for epoch in sorted(self._latest.all_steps(), reverse=True):
      restored, reason = self._verified(self._latest, epoch, like)
      if restored is not None:
        return restored
      other = self._other_structure(self._latest, epoch, like)
      if other:  # not damage: a state of another version or model; nothing is deleted
        raise ValueError(
            f"checkpoints: {os.path.join(self.root, 'latest', str(epoch))} holds a state of another "
            f"structure than this run's ({other}), written by another mmjax version or model; "
            "nothing was deleted: resume it with the code that wrote it, or train into a new workdir")
      reasons.append(f"epoch {epoch}: {reason}")
      log(f"checkpoint {os.path.join(self.root, 'latest', str(epoch))} is unusable ({reason}); "
          "falling back to the previous one")
      self._latest.delete(epoch)
    if reasons:
      raise ValueError(f"checkpoints: no usable checkpoint in {os.path.join(self.root, 'latest')} "
                       f"({'; '.join(reasons)}); train again into a new workdir")
    return None

  def restore_best(self, like: Any, epoch: int, upto: int) -> Any:
    """The state of ``epoch`` saved as best (or, if that copy is unusable, a latest checkpoint of
    that epoch), verified like :meth:`restore_latest`; ``None`` for ``epoch = 0`` (no epoch was
    best yet) and when a later best (after ``upto``, the restored epoch: a run killed between the
    two saves of :meth:`save`, or a fallback) replaced it: the resumed run redoes that epoch
    bit-identically, so it becomes best again. Such later best checkpoints are deleted, to be saved
    again.

    Raises:
      ValueError: no usable copy of the best state is left (naming the directory).
    """
    self._latest.wait_until_finished()
    ahead = [step for step in self._best.all_steps() if step > upto]
    for step in ahead:
      self._best.delete(step)
    if not epoch:
      return None
    reasons = []
    for manager in (self._best, self._latest):
      if epoch in manager.all_steps():
        restored, reason = self._verified(manager, epoch, like)
        if restored is not None:
          return restored[0]
        reasons.append(reason)
    if ahead and not reasons:  # saving best `ahead` replaced this one; redoing it saves it again
      return None
    raise ValueError(
        f"checkpoints: the best state (epoch {epoch}) has no usable copy in {self.root} "
        f"({'; '.join(reasons) or 'not kept'}); train again into a new workdir")

  def save_interrupted(self, state: Any, meta: dict[str, Any]) -> None:
    """Saves the mid-epoch ``state`` of a run stopped by a signal (``meta``: the epoch, its steps
    done, the metric sums so far), keyed by the step; replaces an earlier one."""
    self.clear_interrupted()
    self._interrupted.save(int(jax.device_get(state.step)), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta, checksum=state_checksum(state)))))
    self._interrupted.wait_until_finished()

  def restore_interrupted(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """The verified mid-epoch checkpoint of :meth:`save_interrupted`, or ``None`` (none, or
    unusable: the run then redoes that epoch from its start)."""
    step = self._interrupted.latest_step()
    return None if step is None else self._verified(self._interrupted, step, like)[0]

  def clear_interrupted(self) -> None:
    for step in self._interrupted.all_steps():
      self._interrupted.delete(step)

  def close(self) -> None:
    self._latest.close()
    self._best.close()
    self._interrupted.close()

  @staticmethod
  def _other_structure(manager: ocp.CheckpointManager, epoch: int, like: Any) -> str | None:
    """How the arrays saved at ``epoch`` differ from ``like``'s (the multiset of shapes and
    dtypes, from orbax's metadata), or ``None``: the same, or the metadata unreadable (damage)."""
    try:
      saved = jax.tree.leaves(manager.item_metadata(epoch)["state"].tree)
    except Exception:  # pylint: disable=broad-except  (no readable metadata: damage, not a mismatch)
      return None
    signature = lambda leaves: sorted(
        (tuple(x.shape), str(jax.random.key_data(x).dtype if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x.dtype)) for x in leaves)
    try:
      ours, theirs = signature(jax.tree.leaves(like)), signature(saved)
    except (AttributeError, TypeError):
      return None
    if ours == theirs:
      return None
    if len(ours) != len(theirs):
      return f"{len(theirs)} arrays saved, {len(ours)} expected"
    return f"{len(ours)} arrays, but of other shapes or dtypes"

  @staticmethod
  def _verified(manager: ocp.CheckpointManager, epoch: int, like: Any):
    """``((state, meta), None)`` if step ``epoch`` restores and verifies, else ``(None, reason)``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      restored = manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      state, meta = restored["state"], dict(restored["meta"])
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore / JSON errors)
      return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    host = jax.device_get(state)  # one transfer for the checksum and the finite check
    saved = meta.pop("checksum", None)
    if saved is not None and saved != state_checksum(host):
      return None, "checksum mismatch"
    floats = [x for x in jax.tree.leaves(host)
              if jax.dtypes.issubdtype(getattr(x, "dtype", None), np.floating)]
    if not all(np.isfinite(np.asarray(x)).all() for x in floats):
      return None, "non-finite values"
    return (state, meta), None
