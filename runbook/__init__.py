"""What the runbooks share that is neither a client call nor a flow: settings, models, decisions."""
