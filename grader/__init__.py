"""The grader: the table of contents of a grading run. No model or metric code lives here.

- :mod:`grader.cli`      the command line (``python grader.py ...``) and its exit codes
- :mod:`grader.outdir`   the output folder: writable, an earlier run refused or moved aside (``--force``)
- :mod:`grader.run`      grade one milestone: shape tests -> train or load -> gates -> report
- :mod:`grader.parallel` ``all --jobs N``: milestones in child processes
- :mod:`grader.verify`   ``verify REPORT.json``: re-measure a report's gates from its checkpoint
- :mod:`grader.report`   the report dict and its Markdown / JUnit views
- :mod:`grader.offline`  the network guard (offline unless ``--download``)

What is graded is reached only through :mod:`milestones.adapters`; what it is measured with
is the grader's own (:mod:`eval`, :mod:`eval.reference`).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: the message says what to do; exit code 2."""
