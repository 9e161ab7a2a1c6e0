"""The presets shipped with the package: `--config demo` (or smoke, example) loads one."""
