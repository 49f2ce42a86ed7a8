"""What every stage shares: typed config, errors, atomic writes, folder locks, devices and threads, progress,
and the one table of file names."""
