"""Start-up hook of the grader's child processes: installs the offline guard when MMSYS_OFFLINE=1.

:func:`grader.offline.child_env` puts this folder first on a child's ``PYTHONPATH``, so Python's
``site`` imports this module before the child runs anything else (the shape-test pytest,
``all --jobs`` children, torchrun workers and whatever they start). The checkout is on
``sys.path`` only while :mod:`grader.offline` is imported, so the child's own imports resolve as
they would without it. A ``sitecustomize`` this one shadows is run afterwards. If the guard
cannot be installed the child stops (exit 2): an unguarded child would make the report's
"nothing was downloaded" a guess.
"""

import os
import sys


def _install() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    sys.path.insert(0, repo)
    try:
        from grader.offline import install_from_env
        install_from_env()
    except Exception as e:  # noqa: BLE001 - any failure means the child would run unguarded
        sys.stderr.write(f"grader: error: the offline guard could not be installed in a child process ({e}); "
                         "pass --download to run without it\n")
        os._exit(2)
    finally:
        sys.path.remove(repo)


def _run_shadowed() -> None:
    """Run the next ``sitecustomize`` on ``sys.path`` (this one hides it)."""
    import importlib.machinery
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("MMSYS_OFFLINE") == "1":
    _install()
_run_shadowed()
