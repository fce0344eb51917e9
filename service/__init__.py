"""qforget's request service: settings, database, API and the command line."""
