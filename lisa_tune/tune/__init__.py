"""The tuner: an Optuna search over gamma and K by short real LISA trials."""
