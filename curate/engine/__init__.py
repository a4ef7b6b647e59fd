"""Where work runs: one ``map_tasks`` seam over in-process, process-pool and Ray execution."""
