"""The grader's own copy of the bundled library: ``eval.reference.<module>`` is ``mmsys/<module>.py``.

The grader's instruments (data, judges, metrics' feature networks, pixel conversions) import the
bundled code from here, never as ``mmsys``: ``mmsys`` is the implementation under test, which
``--impl`` replaces (:func:`milestones.adapters.use_implementation`). Because the bundled
package uses only relative imports inside itself, loading its files under this name gives an
independent copy whose modules import each other, and nothing of the graded package:

    from eval.reference.data.world import make_split   # always the grader's world

Nothing is copied on disk: this package's search path is the bundled ``mmsys/`` folder.
"""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "mmsys"
__path__ = [str(BUNDLED)]  # submodules are looked up in the bundled package's folder
