"""The shipped config groups. Installed, this folder is the package `trainer.configs` (pyproject.toml), which
Hydra reads as pkg://trainer.configs: it needs this file to import it."""
