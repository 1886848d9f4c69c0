"""Pure decisions over plain data: no clients, no Prefect, no I/O. Tested with literal values."""
