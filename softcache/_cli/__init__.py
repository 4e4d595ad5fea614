"""The ``softcache`` command: argument parsing and every table and report it prints."""
