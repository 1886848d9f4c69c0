"""One module per runbook procedure; each flow reads like its page of the runbook."""
