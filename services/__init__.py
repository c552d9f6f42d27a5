"""The work of backup-scheduler: callable from HTTP handlers, the CLI and tests alike. No Flask here."""
