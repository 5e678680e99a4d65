"""Driver scripts run INSIDE the client venvs as separate processes; they never import fedgate."""
