-- DataComp baseline `no_filter`: every sample of the pool.
SELECT uid FROM pool
