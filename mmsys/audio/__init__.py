"""Audio: waveforms, the log-mel front end, SpecAugment and the AST-style audio tower."""
