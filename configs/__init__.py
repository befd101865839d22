"""The YAML configs shipped with icehpc (package data ``icehpc.configs``; see icehpc.config.find_config)."""
