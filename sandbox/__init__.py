"""A local, real stand-in for the ComplianceAgent platform: for tests and the one-command
sandbox."""
