"""The alert bridge: Alertmanager's webhook in, Prefect events out (`bridge.app`)."""
