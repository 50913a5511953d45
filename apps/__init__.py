"""Command-line programs (and, later, the web page) over the library: sampling, generation,
captioning, retrieval. Nothing in ``mmsys`` imports them (an import-linter contract)."""
