"""tinymind's helper scripts, run from the repository root as modules: python -m scripts.prepare_data --help."""
