"""Crashes injected into lh-train's checkpoint saves, for tests/integration/test_checkpoint_kills.py.

A process started with this folder on PYTHONPATH imports this module at start-up (Python's `site`
imports `sitecustomize` from the path). With LH_DIST_TEST_KILL=<point>:<step>[:<rank>] set, the rank
of that RANK (default 0) SIGKILLs itself, like a crashed node, during the save of that step:

    write     its DeepSpeed files written (`Engine.save` returned), its trainer state not yet
    manifest  after the barrier of the save, before rank 0 writes the manifest
    rename    just before the complete save is renamed into place (a step saved before is set aside)
    rotate    once rotation has renamed the first old checkpoint aside, before deleting it

It wraps lh_dist's own functions from outside; lh_dist itself knows nothing of it.
"""

import os
import signal
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, step: int) -> None:
    from lh_dist.checkpoint import checkpointer
    from lh_dist.checkpoint.format import PARTIAL, step_name
    from lh_dist.train.engine import Engine

    name = step_name(step)
    saving = []  # the step whose save is running

    def tracked(save):
        def save_tracked(self, engine, s, *args, **kwargs):
            saving.append(s)
            try:
                return save(self, engine, s, *args, **kwargs)
            finally:
                saving.pop()
        return save_tracked

    checkpointer.Checkpointer.save = tracked(checkpointer.Checkpointer.save)

    if point == "write":
        engine_save = Engine.save

        def save_then_die(self, folder, *args, **kwargs):
            result = engine_save(self, folder, *args, **kwargs)
            if saving == [step]:
                _die()
            return result

        Engine.save = save_then_die
    elif point == "manifest":
        write_manifest = checkpointer.Checkpointer._write_manifest

        def die_before_manifest(self, partial, s, *args, **kwargs):
            if s == step:
                _die()
            return write_manifest(self, partial, s, *args, **kwargs)

        checkpointer.Checkpointer._write_manifest = die_before_manifest
    elif point in ("rename", "rotate"):
        class OsDyingOnReplace:
            """The os module as checkpointer.py sees it, with a replace that dies at the chosen rename."""

            def __getattr__(self, attr):
                return getattr(os, attr)

            @staticmethod
            def replace(src, dst):
                if saving == [step] and point == "rename" and Path(src).name == f"{PARTIAL}{name}":
                    _die()
                os.replace(src, dst)
                if saving == [step] and point == "rotate" and Path(dst).name.startswith(checkpointer.DELETING):
                    _die()

        checkpointer.os = OsDyingOnReplace()
    else:
        raise ValueError(f"LH_DIST_TEST_KILL: unknown point {point!r}")


_spec = os.environ.get("LH_DIST_TEST_KILL", "")
if _spec:
    _point, _step, *_rank = _spec.split(":")
    # torchrun's own process counts as rank 0 here too; it never saves, so the wrappers do nothing there.
    if int(os.environ.get("RANK", "0")) == (int(_rank[0]) if _rank else 0):
        _install(_point, int(_step))
