#!/usr/bin/env python
"""mmsys grader: proves each milestone works (``python grader.py --help``; see grader/cli.py)."""

import sys

from grader.cli import main

if __name__ == "__main__":
    sys.exit(main())
