"""The memory simulator: predicts the peak memory of a LISA step by tracing it on the meta device."""
